"""The local object store (files, signed download URLs) and the model registry file."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from ndif_scheduler.config import Settings
from ndif_scheduler.registry import Deployment, Registry, load_registry, parse_registry
from ndif_scheduler.storage import LocalStore, MissingObject, open_store, request_key, result_key

SECRET = b"test-secret"


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "objects", "http://example.test:9000/", SECRET)


def url_parts(url: str) -> tuple[str, str, int, str]:
    """(origin + path prefix, key, expires, signature) of a local download URL."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    prefix = "/v1/blobs/"
    assert parts.path.startswith(prefix)
    return (
        f"{parts.scheme}://{parts.netloc}",
        unquote(parts.path[len(prefix) :]),
        int(query["expires"][0]),
        query["signature"][0],
    )


# -- LocalStore -------------------------------------------------------------------------------


def test_put_get_delete(store, tmp_path):
    store.put("results/abc", b"hello")
    assert store.get("results/abc") == b"hello"
    assert (tmp_path / "objects" / "results" / "abc").read_bytes() == b"hello"
    store.put("results/abc", b"replaced")
    assert store.get("results/abc") == b"replaced"
    store.delete("results/abc")
    with pytest.raises(MissingObject):
        store.get("results/abc")
    store.delete("results/abc")  # deleting what is gone is fine
    assert not (tmp_path / "objects" / "results" / "abc").exists()


def test_missing_object_is_a_key_error(store):
    with pytest.raises(KeyError) as raised:
        store.get("requests/never-written")
    assert isinstance(raised.value, MissingObject)


def test_put_leaves_no_partial_files(store, tmp_path):
    for index in range(5):
        store.put(f"results/job{index}", os.urandom(1000 + index))
    names = sorted(path.name for path in (tmp_path / "objects" / "results").iterdir())
    assert names == [f"job{index}" for index in range(5)]
    assert not any(".partial-" in str(path) for path in (tmp_path / "objects").rglob("*"))


def test_put_replaces_atomically(store, tmp_path, monkeypatch):
    """The blob is written elsewhere and renamed over the target in one step."""
    store.put("results/x", b"old")
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(source, target):
        replaced.append((os.path.basename(source), os.fspath(target)))
        # While the new blob is being moved in, the target still holds the old one.
        assert Path(target).read_bytes() == b"old"
        assert Path(source).read_bytes() == b"new"
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    store.put("results/x", b"new")
    assert len(replaced) == 1
    assert replaced[0][0].startswith(".partial-")
    assert replaced[0][1] == str((tmp_path / "objects" / "results" / "x").resolve())
    assert store.get("results/x") == b"new"


@pytest.mark.parametrize("key", ["../x", "results/../../x", "/etc/passwd", "", ".", "results/../.."])
def test_keys_outside_the_root_are_refused(store, tmp_path, key):
    (tmp_path / "x").write_bytes(b"outside")
    with pytest.raises(MissingObject):
        store.get(key)
    with pytest.raises(MissingObject):
        store.put(key, b"evil")
    with pytest.raises(MissingObject):
        store.delete(key)
    assert (tmp_path / "x").read_bytes() == b"outside"


def test_download_url_signature_verifies(store):
    store.put("results/abc", b"data")
    before = time.time()
    url = store.download_url("results/abc", 60)
    origin, key, expires, signature = url_parts(url)
    assert origin == "http://example.test:9000"
    assert key == "results/abc"
    assert before + 59 <= expires <= time.time() + 61
    assert store.verify(key, expires, signature) is True


def test_tampered_or_expired_urls_fail(store):
    _, key, expires, signature = url_parts(store.download_url("results/abc", 60))
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert store.verify(key, expires, flipped) is False
    assert store.verify("results/other", expires, signature) is False  # another key
    assert store.verify(key, expires + 1, signature) is False  # a later expiry
    other = LocalStore(store.root, store.public_url, b"another-secret")
    assert other.verify(key, expires, signature) is False
    _, key, expires, signature = url_parts(store.download_url("results/abc", -5))
    assert expires < time.time()
    assert store.verify(key, expires, signature) is False  # expired, though correctly signed


def test_ping_and_key_helpers(store, tmp_path):
    store.ping()
    assert request_key("j1") == "requests/j1" and result_key("j1") == "results/j1"
    gone = LocalStore(tmp_path / "gone", "http://x", SECRET)
    gone.root.rmdir()
    with pytest.raises(OSError):
        gone.ping()


def test_open_store_without_s3_is_local(tmp_path):
    settings = Settings(state_dir=tmp_path, signing_secret="s3cret", public_url="http://api.test")
    store = open_store(settings)
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "objects"
    assert store.secret == b"s3cret"
    assert store.download_url("a", 10).startswith("http://api.test/v1/blobs/a?expires=")


def test_signing_secret_is_made_once_per_state_dir(tmp_path):
    first = Settings(state_dir=tmp_path).secret
    second = Settings(state_dir=tmp_path).secret
    assert first == second and len(first) == 64
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600


# -- registry ---------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_registry_resolves_relative_paths_against_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    (folder / "models" / "tiny").mkdir(parents=True)
    registry = load_registry(
        write(
            folder / "models.toml",
            '[[deployments]]\nkey = "tiny"\npath = "models/tiny"\naliases = ["t", "small"]\nreplicas = 2\n'
            '[[deployments]]\nkey = "hub"\npath = "org/hub-model"\nbackend = "vllm"\n'
            "tensor_parallel_size = 2\nnum_gpus = 2\n",
        )
    )
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    assert registry.keys == ["tiny", "hub"]
    tiny, hub = registry.deployments
    assert tiny.path == str((folder / "models" / "tiny").resolve())
    assert tiny.aliases == ("t", "small") and tiny.replicas == 2
    assert [tiny.actor_name(i) for i in range(2)] == ["tiny#0", "tiny#1"]
    assert hub.path == "org/hub-model"  # no such folder: a hub id, left as written
    assert (hub.backend, hub.tensor_parallel_size, hub.num_gpus) == ("vllm", 2, 2)
    assert tiny.to_dict()["aliases"] == ["t", "small"]


def test_resolve_by_key_alias_and_path(tmp_path):
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(model)
    registry = load_registry(
        write(tmp_path / "r.toml", '[[deployments]]\nkey = "tiny"\npath = "models/tiny"\naliases = ["t"]\n')
    )
    tiny = registry.get("tiny")
    assert tiny is not None
    assert registry.resolve("tiny") is tiny
    assert registry.resolve("t") is tiny
    assert registry.resolve(str(model.resolve())) is tiny
    assert registry.resolve(str(link)) is tiny  # another path to the same folder
    assert registry.resolve("models/tiny") is None  # relative names are not guessed at
    assert registry.resolve("unknown") is None
    assert registry.get("t") is None  # get is by key only


def test_duplicate_keys_are_refused(tmp_path):
    path = write(
        tmp_path / "r.toml", '[[deployments]]\nkey = "a"\npath = "x"\n[[deployments]]\nkey = "a"\npath = "y"\n'
    )
    with pytest.raises(ValueError, match="'a' appears twice"):
        load_registry(path)


def test_bad_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of transformers, vllm"):
        load_registry(write(tmp_path / "r.toml", '[[deployments]]\nkey = "a"\npath = "x"\nbackend = "onnx"\n'))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"key": "a", "path": "x", "colour": "red"}, "model registry: .*colour"),
        ({"path": "x"}, "model registry: .*key"),
        ({"key": "a", "path": "x", "replicas": 0}, "at least 1"),
        ({"key": "a", "path": "x", "max_concurrency": 0}, "at least 1"),
    ],
)
def test_bad_entries_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_registry({"deployments": [entry]})


def test_parse_registry_without_base_keeps_paths_and_empty_is_empty():
    registry = parse_registry({"deployments": [{"key": "a", "path": "rel/path"}]})
    assert registry.deployments == (Deployment(key="a", path="rel/path"),)
    assert parse_registry({}) == Registry(())
    assert parse_registry({}).keys == []
