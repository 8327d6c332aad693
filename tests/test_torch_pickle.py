"""PyTorch files read by the restricted unpickler: every tensor torch.save writes comes back
exactly, and a pickle that would run code is refused before anything runs."""

import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from longlora_jax.errors import CheckpointError
from longlora_jax.io.torch_pickle import load_torch_file

torch = pytest.importorskip("torch")


def test_state_dicts_written_by_torch_save_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 8, generator=g)
    state = collections.OrderedDict(
        f32=torch.randn(3, 5, generator=g),
        f16=torch.randn(4, generator=g).half(),
        bf16=torch.randn(2, 3, generator=g).to(torch.bfloat16),
        view=big[1:5, ::3],  # offset + strides into a shared storage
        transposed=big.t(),
        shared=big,
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        ints=torch.arange(7),
        flags=torch.tensor([True, False]),
        scalar=torch.tensor(3.5),
    )
    path = tmp_path / "weights.bin"
    torch.save(state, path)
    got = load_torch_file(path)
    assert list(got) == list(state)
    for name, tensor in state.items():
        want = tensor.detach()
        if want.dtype == torch.bfloat16:
            want_np = want.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            want_np = want.numpy()
        assert got[name].dtype == want_np.dtype, name
        np.testing.assert_array_equal(got[name], want_np, err_msg=name)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.ones(2), "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refusing the pickled global (posix|os)\.system"):
        load_torch_file(path)
    assert not (tmp_path / "pwned").exists()
    # A hand-made archive whose pickle calls builtins.eval.
    crafted = tmp_path / "crafted.bin"
    with zipfile.ZipFile(crafted, "w") as z:
        z.writestr("archive/data.pkl", b"cbuiltins\neval\n(Vprint('ran')\ntR.")
    with pytest.raises(CheckpointError, match=r"builtins\.eval"):
        load_torch_file(crafted)


def test_legacy_and_non_tensor_files_are_one_line_errors(tmp_path):
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy .* never unpickled"):
        load_torch_file(legacy)
    not_dict = tmp_path / "list.bin"
    torch.save([torch.ones(1)], not_dict)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_torch_file(not_dict)
    buffer = io.BytesIO()
    pickle.dump({"w": 1}, buffer)
    with pytest.raises(CheckpointError, match="legacy"):
        (tmp_path / "plain.pkl").write_bytes(buffer.getvalue())
        load_torch_file(tmp_path / "plain.pkl")
