"""The model store: 'idfzip models add' installs a model file under its name, 'compress --model NAME' uses it, and
a file written with it decodes without --model; a missing model is one line naming it and how to install it, and a
model that is not the one the file's hash names is refused. The store is the session's temporary folder
(conftest sets IDFZIP_MODELS), never the user's."""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_model, photo
from PIL import Image

import idfzip
from idfzip import registry
from idfzip.cli import cli
from idfzip.errors import ModelMismatchError, ModelNotFoundError


def _cli(*args):
    """(exit status, what the user reads: the output, and an error's message as main() prints it)."""
    r = CliRunner().invoke(cli, list(map(str, args)))
    if r.exception is not None and not isinstance(r.exception, (idfzip.IdfzipError, SystemExit)):
        raise r.exception
    error = f"Error: {r.exception}" if isinstance(r.exception, idfzip.IdfzipError) else ""
    return r.exit_code, r.output + error


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("IDFZIP_MODELS", str(tmp_path / "store"))
    return tmp_path / "store"


def test_the_store_is_never_the_users():
    assert registry.store_dir() == Path(os.environ["IDFZIP_MODELS"]) and "idfzip-test-models-" in str(
        registry.store_dir()
    )


def test_an_installed_model_is_found_by_the_files_it_wrote(store, tmp_path):
    lab = make_model(tmp_path / "mine", "lab")
    im = Image.fromarray(photo(96, 64, seed=3))
    data = idfzip.compress(im, lab.path, flow_only=True)
    assert idfzip.inspect(data)["model"] == "lab"
    with pytest.raises(ModelNotFoundError, match=rf"'lab' \(sha256 {lab.sha256[:4].hex()}.*models add lab"):
        idfzip.decompress(data)
    (tmp_path / "a.idfz").write_bytes(data)
    code, out = _cli("decompress", "-t", tmp_path / "a.idfz")
    assert code == 1 and out.count("\n") == 1 and "idfzip models add lab.safetensors" in out, out

    code, out = _cli("models", "add", lab.path)
    assert code == 0 and "lab: installed in" in out and (store / "lab.safetensors").is_file()
    assert "lab" in _cli("models", "-q")[1].split() and "installed" in _cli("models")[1]
    assert idfzip.decompress(data).tobytes() == im.tobytes()  # no --model: found by its name, checked by hash
    assert _cli("decompress", "-t", tmp_path / "a.idfz")[0] == 0
    assert idfzip.compress(im, "lab", flow_only=True) == data  # by name
    assert "already installed" in _cli("models", "add", lab.path)[1]


def test_another_model_of_the_same_name_is_refused_or_replaced_on_purpose(store, tmp_path):
    lab = make_model(tmp_path / "one", "lab")
    other = make_model(tmp_path / "two", "lab", prior_hidden=6)
    im = Image.fromarray(photo(96, 64, seed=4))
    data = idfzip.compress(im, lab.path, flow_only=True)
    assert _cli("models", "add", lab.path)[0] == 0
    code, out = _cli("models", "add", other.path)
    assert code == 1 and "another model called 'lab' is installed" in out
    assert idfzip.decompress(data).tobytes() == im.tobytes()
    assert _cli("models", "add", "--force", other.path)[0] == 0
    with pytest.raises(ModelMismatchError, match="'lab'"):  # the file's hash names the model it needs
        idfzip.decompress(data)


def test_what_cannot_be_installed(store, tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a model")
    code, out = _cli("models", "add", bad)
    assert code == 1 and "not a valid safetensors model file" in out
    shipped = tmp_path / "natural.safetensors"
    shipped.write_bytes(registry.shipped("natural").read_bytes())
    code, out = _cli("models", "add", shipped)
    assert code == 1 and "a shipped model is called 'natural'" in out
    assert not store.exists() or not list(store.iterdir())
    Image.fromarray(photo(96, 64)).save(tmp_path / "x.png")
    code, out = _cli("compress", "--model", "nosuch", tmp_path / "x.png")
    assert code == 1 and "no model named 'nosuch'" in out and "idfzip models add FILE" in out, out
