"""Security: no checkpoint load runs pickled code, services bind to localhost by default.

A source scan (AST, not grep) of the package refuses ``torch.load`` without ``weights_only=True`` and any
other way of unpickling or evaluating data; the scanner is itself checked on a snippet holding each
forbidden call. A real malicious checkpoint (its unpickling would create a folder) is then given to every
loader of ours: each refuses it and the folder never appears. What `raydistill submit` uploads and forwards
is tested in tests/test_jobs.py (credentials, data and run outputs excluded; only named variables sent).
"""

from __future__ import annotations

import ast
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "raydistill"

# module -> functions that load (or evaluate) arbitrary objects from bytes.
_UNSAFE_CALLS = {
    "pickle": {"load", "loads", "Unpickler"},
    "cloudpickle": {"load", "loads"},
    "dill": {"load", "loads"},
    "joblib": {"load"},
    "marshal": {"load", "loads"},
    "shelve": {"open"},
    "yaml": {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"},
    "os": {"system", "popen"},
}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    # A method of a computed value (``model.to(d).eval()``) is not the builtin of the same name.
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")
    return ".".join(reversed(parts))


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """Every call in ``source`` that can run code hidden in data, as ``file:line: reason``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        module, _, attr = name.rpartition(".")
        where = f"{filename}:{node.lineno}"
        if name.endswith("torch.load"):
            if not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif module.split(".")[-1] in _UNSAFE_CALLS and attr in _UNSAFE_CALLS[module.split(".")[-1]]:
            found.append(f"{where}: {name} can run code from data")
        elif name in ("eval", "exec"):
            found.append(f"{where}: {name}()")
        elif name.endswith("np.load") or name.endswith("numpy.load"):
            if _keyword_is(node, "allow_pickle", True):
                found.append(f"{where}: np.load(allow_pickle=True)")
        if _keyword_is(node, "trust_remote_code", True):
            found.append(f"{where}: trust_remote_code=True runs code from the model repository")
        if _keyword_is(node, "shell", True):
            found.append(f"{where}: shell=True")
    return found


def test_the_scanner_finds_each_unsafe_call() -> None:
    snippet = """
import pickle, yaml, torch, numpy as np, subprocess, os
torch.load("a.pt")
torch.load("a.pt", weights_only=False)
pickle.loads(b"")
yaml.load("a: 1", Loader=yaml.Loader)
np.load("x.npy", allow_pickle=True)
eval("1 + 1")
AutoModel.from_pretrained("x", trust_remote_code=True)
subprocess.run("ls", shell=True)
os.system("ls")
torch.load("b.pt", map_location="cpu", weights_only=True)
yaml.safe_load("a: 1")
np.load("x.npy")
"""
    found = unsafe_calls(snippet)
    assert [f.split(":", 2)[1] for f in found] == [str(n) for n in range(3, 12)]
    assert "torch.load without weights_only=True" in found[0] and "pickle.loads" in found[2]


def test_the_package_has_no_unsafe_loads() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [f for path in files for f in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert found == []
    # ... and it does load checkpoints: the scan looked at real torch.load calls.
    loads = sum(path.read_text(encoding="utf-8").count("torch.load(") for path in files)
    assert loads >= 4


# ---- a real malicious checkpoint ----------------------------------------------------------------------------


class _Payload:
    """Unpickling this object calls ``os.mkdir(path)``: harmless, and visible."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture()
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A torch checkpoint whose unpickling creates ``<tmp>/pwned`` (and proof that it really does)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Payload(marker)}, path)
    proof = tmp_path / "proof"
    torch.save({"x": _Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)  # the unsafe way: the payload runs
    assert proof.is_dir()
    return path, marker


def test_student_weights_loader_refuses_pickled_code(evil: tuple[Path, Path]) -> None:
    from raydistill.models.towers import _read_state_dict

    path, marker = evil
    with pytest.raises(ValueError, match=f"could not read weights file {path}"):
        _read_state_dict(path)
    assert not marker.exists()


def test_beit3_loader_refuses_pickled_code(evil: tuple[Path, Path]) -> None:
    from raydistill.models.teachers.beit3 import read_state_dict

    path, marker = evil
    with pytest.raises(ValueError, match=f"teacher.checkpoint: {path} cannot be read"):
        read_state_dict(path)
    assert not marker.exists()


def test_training_checkpoints_refuse_pickled_code(evil: tuple[Path, Path], tmp_path: Path) -> None:
    from raydistill.pipeline.trainer import STATE_FILE, latest_checkpoint

    path, marker = evil
    checkpoint = tmp_path / "ray_train" / "run" / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    os.replace(path, checkpoint / STATE_FILE)
    # The recovery scan skips it (as it skips a truncated copy), and a direct load refuses it.
    assert latest_checkpoint(checkpoint.parent) is None
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(checkpoint / STATE_FILE, weights_only=True)
    from raydistill.pipeline.export import export_student
    from raydistill.config import config_from_dict

    cfg = config_from_dict({"student": {"preset": "test"}})
    with pytest.raises(pickle.UnpicklingError):
        export_student(checkpoint, cfg, 16, None, tmp_path / "student")
    assert not marker.exists()
    assert not (tmp_path / "student").exists()


# ---- services bind to localhost ---------------------------------------------------------------------------


def test_a_local_ray_instance_serves_its_dashboard_on_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import ray

    from raydistill.config import config_from_dict
    from raydistill.pipeline import ray_env

    calls: list[dict] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or SimpleNamespace(address_info={}, dashboard_url=None))
    ray_env.init_ray(config_from_dict({"ray": {"num_cpus": 3}}))
    assert len(calls) == 1
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 3
    assert calls[0]["dashboard_host"] == "127.0.0.1" and calls[0]["_node_ip_address"] == "127.0.0.1"


def test_mlflow_server_binds_to_localhost_unless_told(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from raydistill.cli import main

    assert main(["mlflow-server", "--store", str(tmp_path / "store"), "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert main(["mlflow-server", "--store", str(tmp_path / "store"), "--host", "0.0.0.0", "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip())
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert not (tmp_path / "store").exists()  # a dry run creates nothing
