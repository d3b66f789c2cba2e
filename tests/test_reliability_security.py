"""Nothing untrusted runs, nothing from a request reaches the file system (issue 8, part 4).

* Model directories: a pickle in place of ``model.safetensors``, a ``.pth`` named by
  config.json, and ``weights.file`` paths that leave the directory are refused by every entry
  point that loads a model (``predict``, ``evaluate``, ``serve``), and the pickle never runs.
* An ONNX graph whose external data points outside its directory is refused.
* The source tree never unpickles: every ``torch.load`` has ``weights_only=True``, no
  ``pickle``/``marshal``/``dill``/``joblib``/``shelve`` loads, no ``np.load`` with pickles,
  no unsafe YAML, no ``eval``/``exec``/``torch.jit.load`` (an AST scan).
* Upload names and zip member names (``../../x``, absolute paths, backslashes) are only ever
  echoed, sanitised: an audit hook proves no file-system call ever sees them (REST API), or
  sees them only inside Gradio's own upload folder (web UI upload route).
* Gradio's file route serves nothing outside its allowed folders; every route, Gradio's
  included, sends the security headers; ``celluscan serve`` binds loopback by default and
  warns when told otherwise.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from test_serving_helpers import make_model_dir, png_bytes

from celluscan.cli import main as celluscan_main
from celluscan.models import ModelDirError, load_model_dir
from celluscan.serving import cli as serve_cli
from celluscan.serving.app import create_app
from celluscan.serving.limits import ServingLimits
from celluscan.serving.service import ModelService

SRC = Path(__file__).resolve().parent.parent / "src" / "celluscan"
API = "/api/v1"
MARKER = "zz-audit-marker-7f3c"


# ---- crafted model directories ------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edit_config(model: Path, edit) -> None:
    doc = json.loads((model / "config.json").read_text())
    edit(doc)
    (model / "config.json").write_text(json.dumps(doc))


def _craft(kind: str, model: Path, marker: Path) -> tuple[str, ...]:
    """Turn a good model directory into a malicious one; returns acceptable error fragments."""
    if kind == "pickle_weights":  # attacker replaced the weights file only
        (model / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
        return ("sha256",)
    if kind == "pickle_weights_no_checksum":  # ... and removed the checksum from config.json
        (model / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
        _edit_config(model, lambda d: d["weights"].pop("sha256"))
        return ("safetensors",)
    if kind == "pth_named_by_config":  # a torch.save pickle the config points at
        torch.save({"evil": _Payload(marker)}, model / "model.pth")
        _edit_config(model, lambda d: d["weights"].update(file="model.pth"))
        return ("weights.file",)
    if kind == "weights_path_traversal":
        _edit_config(model, lambda d: d["weights"].update(file="../../etc/passwd"))
        return ("weights.file",)
    if kind == "weights_absolute_path":
        _edit_config(model, lambda d: d["weights"].update(file="/etc/passwd"))
        return ("weights.file",)
    raise AssertionError(kind)


CRAFTED = ("pickle_weights", "pickle_weights_no_checksum", "pth_named_by_config",
           "weights_path_traversal", "weights_absolute_path")


def test_payload_is_live(tmp_path):
    """Positive control: the payload really runs when unpickled unsafely."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", CRAFTED)
def test_crafted_model_dir_is_refused_by_the_loader(kind, tmp_path):
    model = make_model_dir(tmp_path / "model")
    marker = tmp_path / "pwned"
    reasons = _craft(kind, model, marker)
    with pytest.raises(ModelDirError) as err:
        load_model_dir(model)
    assert str(model) in str(err.value) and any(r in str(err.value) for r in reasons), err.value
    assert not marker.exists()


@pytest.mark.parametrize("entry", ("predict", "evaluate", "serve"))
@pytest.mark.parametrize("kind", CRAFTED)
def test_crafted_model_dir_is_refused_by_every_entry_point(kind, entry, tmp_path, capsys, monkeypatch):
    model = make_model_dir(tmp_path / "model")
    marker = tmp_path / "pwned"
    reasons = _craft(kind, model, marker)
    images = tmp_path / "data" / "lymphocyte"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(png_bytes(1))
    if entry == "predict":
        code = celluscan_main(["predict", str(images / "a.png"), "--model", str(model), "-q"])
        assert code == 1
    elif entry == "evaluate":
        code = celluscan_main(["evaluate", str(tmp_path / "data"), "--model", str(model),
                               "--output-dir", str(tmp_path / "out")])
        assert code == 2 and not (tmp_path / "out").exists()
    else:
        import uvicorn

        monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("server started"))
        code = celluscan_main(["serve", "--model", str(model), "--no-ui"])
        assert code == 1
    err = capsys.readouterr().err
    assert str(model) in err and any(r in err for r in reasons), err
    assert not marker.exists()


def test_onnx_external_data_outside_the_model_dir_is_refused(tmp_path):
    from onnx import TensorProto, helper

    from celluscan.inference.backends import OnnxRunner

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16)
    (tmp_path / "model").mkdir()
    for location in ("../secret.bin", str(secret)):
        weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4],
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            weight.external_data.add(key=key, value=value)
        graph = helper.make_graph(
            [helper.make_node("Add", ["images", "W"], ["logits"])], "g",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4])], initializer=[weight])
        path = tmp_path / "model" / "model.onnx"
        path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                         .SerializeToString())
        with pytest.raises(ValueError, match="cannot load ONNX model") as err:
            OnnxRunner(path)
        assert str(path) in str(err.value)


# ---- source scan: no unsafe deserialisation -----------------------------------------------------

_FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "dill", "cloudpickle", "joblib", "shelve"}
_FORBIDDEN_CALLS = {("yaml", "unsafe_load"), ("yaml", "full_load"), ("torch.jit", "load"),
                    ("jit", "load")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Every call in ``source`` that could run code from data (or ``eval``/``exec`` it)."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        owner, _, attr = name.rpartition(".")
        where = f"{filename}:{node.lineno}: {name}"
        if name in ("eval", "exec", "compile", "__import__"):
            problems.append(f"{where} (runs code)")
        elif owner in _FORBIDDEN_MODULES and attr.startswith(("load", "Unpickler", "open")):
            problems.append(f"{where} (unpickles)")
        elif (owner, attr) in _FORBIDDEN_CALLS:
            problems.append(f"{where} (runs code from data)")
        elif name == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
            problems.append(f"{where} without weights_only=True")
        elif owner in ("np", "numpy") and attr == "load" and not (
                _kw(node, "allow_pickle") is None or _is_const(_kw(node, "allow_pickle"), False)):
            problems.append(f"{where} with allow_pickle")
        elif name == "yaml.load" and not _dotted(_kw(node, "Loader") or ast.Name("?")).endswith("SafeLoader"):
            problems.append(f"{where} without SafeLoader")
    return problems


def test_the_scanner_finds_unsafe_calls():
    bad = ("import pickle, torch, yaml, numpy as np\n"
           "pickle.loads(b)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "np.load(p, allow_pickle=True)\nyaml.load(t, Loader=yaml.Loader)\neval('1')\n"
           "torch.jit.load(p)\nyaml.unsafe_load(t)\n")
    assert len(unsafe_calls(bad)) == 8
    good = ("torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, allow_pickle=False)\n"
            "yaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\nmodel.eval()\n")
    assert unsafe_calls(good) == []


def test_source_tree_never_unpickles_or_evals():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        problems += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(SRC.parent)))
    assert problems == []


# ---- request data never becomes a path ----------------------------------------------------------

_AUDIT_LOG: list[tuple[str, str]] | None = None
_AUDIT_INSTALLED = False
_FS_EVENT_PREFIXES = ("os.", "shutil.", "tempfile.", "subprocess.", "glob.")


def _audit(event: str, args: tuple) -> None:
    log = _AUDIT_LOG
    if log is None or not (event == "open" or event.startswith(_FS_EVENT_PREFIXES)):
        return
    try:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)):
                text = os.fsdecode(arg)
                if MARKER in text:
                    log.append((event, text))
    except Exception:  # an audit hook must never raise into the code it watches
        pass


@pytest.fixture
def fs_audit():
    """Records every file-system event (open, os.*, shutil.*, ...) whose arguments contain
    MARKER while the test runs."""
    global _AUDIT_LOG, _AUDIT_INSTALLED
    if not _AUDIT_INSTALLED:
        sys.addaudithook(_audit)  # process-wide and permanent; inert while _AUDIT_LOG is None
        _AUDIT_INSTALLED = True
    _AUDIT_LOG = []
    try:
        yield _AUDIT_LOG
    finally:
        _AUDIT_LOG = None


HOSTILE_NAMES = [f"../../{MARKER}-a.png", f"/tmp/{MARKER}-b.png", f"C:\\Windows\\{MARKER}-c.png",
                 f"..\\..\\{MARKER}-d.png", f"sub/../../{MARKER}-e.png", f"{MARKER}-f\x00.png"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("m") / "model")
    return ModelService.from_model_dir(model, ServingLimits(max_files=40))


@pytest.fixture(scope="module")
def ui_client(service):
    """The whole app (REST API + web UI), built once."""
    return TestClient(create_app(service), raise_server_exceptions=False)


def _assert_display_only(name: str) -> None:
    parts = name.split("/")
    assert not name.startswith("/") and "\\" not in name and "\x00" not in name, name
    assert ".." not in parts and "." not in parts, name


def test_audit_hook_sees_file_system_calls(fs_audit, tmp_path):
    """Positive control for the audit checks below."""
    (tmp_path / f"{MARKER}.txt").write_text("x")
    assert any(event == "open" for event, _ in fs_audit)


def test_hostile_upload_and_zip_member_names_never_reach_the_file_system(service, fs_audit, tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = TestClient(create_app(service, with_ui=False), raise_server_exceptions=False)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, name in enumerate(HOSTILE_NAMES[:5]):  # zipfile keeps these names verbatim
            zf.writestr(zipfile.ZipInfo(name), png_bytes(10 + i))
        zf.writestr(zipfile.ZipInfo(f"/etc/{MARKER}-abs.png"), png_bytes(20))
    uploads = [("files", (n, png_bytes(i), "image/png")) for i, n in enumerate(HOSTILE_NAMES)]
    uploads.append(("files", (f"../{MARKER}.zip", buf.getvalue(), "application/zip")))
    r = client.post(f"{API}/predict", files=uploads)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(HOSTILE_NAMES) + 6
    for res in results:
        assert "class" in res, res  # every one classified: the names change nothing but the label
        _assert_display_only(res["filename"])
        assert MARKER in res["filename"]
    assert results[0]["filename"] == f"{MARKER}-a.png"
    assert results[len(HOSTILE_NAMES)]["filename"] == f"{MARKER}.zip/{MARKER}-a.png"
    assert fs_audit == []  # not opened, created, listed, moved or removed anywhere
    assert list(tmp_path.iterdir()) == []


def test_web_ui_uploads_stay_in_gradio_upload_folder(ui_client, fs_audit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = ui_client.post("/gradio_api/upload",
                    files=[("files", (n, png_bytes(i), "image/png")) for i, n in enumerate(HOSTILE_NAMES)])
    assert r.status_code == 200, r.text
    stored = [Path(p) for p in r.json()]
    assert len(stored) == len(HOSTILE_NAMES)
    upload_root = Path(os.path.commonpath([p.parent.parent for p in stored])).resolve()
    assert upload_root.is_relative_to(Path(tempfile.gettempdir()).resolve())
    for p in stored:
        assert p.resolve().parent.parent == upload_root and MARKER in p.name and p.is_file()
    touched = {Path(path).resolve() for _, path in fs_audit}
    assert touched and all(t.is_relative_to(upload_root) for t in touched), touched
    assert list(tmp_path.iterdir()) == []


def test_gradio_file_route_serves_nothing_outside_its_folders(service, ui_client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    model_config = Path(service.info.path) / "config.json"
    for target in (str(secret), "secret.txt", f"../{tmp_path.name}/secret.txt", "/etc/passwd",
                   str(model_config), "%2Fetc%2Fpasswd", "..%2F..%2Fetc%2Fpasswd"):
        for prefix in ("/gradio_api/file=", "/file=", "/gradio_api/static/", "/static/"):
            r = ui_client.get(prefix + target)
            assert r.status_code in (403, 404), (prefix + target, r.status_code)
            assert "TOP-SECRET" not in r.text and "root:" not in r.text


# ---- headers and binding ------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/config"), ("GET", f"{API}/health"), ("GET", f"{API}/docs"),
    ("GET", f"{API}/openapi.json"), ("GET", "/nope"), ("GET", "/gradio_api/file=/etc/passwd"),
    ("POST", "/gradio_api/upload"), ("POST", f"{API}/predict"),
])
def test_every_route_sends_the_security_headers(ui_client, method, path):
    r = ui_client.request(method, path)
    h = r.headers
    assert h["x-content-type-options"] == "nosniff", path
    assert h["x-frame-options"] in ("DENY", "SAMEORIGIN")
    assert h["referrer-policy"] == "no-referrer"
    csp = h["content-security-policy"]
    assert "default-src 'self'" in csp and "object-src 'none'" in csp
    assert "http:" not in csp and "https:" not in csp and "*" not in csp  # no other origin
    if path.startswith(API):
        assert h["cache-control"] == "no-store"


def test_serve_binds_loopback_by_default_and_warns_otherwise(service, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    model = service.info.path
    assert celluscan_main(["serve", "--model", model, "--no-ui"]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["server_header"] is False
    assert "WARNING" not in capsys.readouterr().err
    assert celluscan_main(["serve", "--model", model, "--no-ui", "--host", "0.0.0.0"]) == 0
    assert calls[-1]["host"] == "0.0.0.0"
    err = capsys.readouterr().err
    assert "WARNING" in err and "network" in err
