"""Rebuild a detector model in models/ from the registry package the manifest names.

    python scripts/build_model.py                      # the manifest's default model
    python scripts/build_model.py ssd-mobilenet-v2-coco
    python scripts/build_model.py --update-manifest    # record the new file's sha256 and size

A model the manifest marks ``committed: false`` is written to models/ (git ignores it) with
its sha256 in ``<file>.sha256`` beside it, which the loader checks.

Steps: fetch the package with its ordinary client (``npm pack`` or ``pip download``), check its
digest and the sha256 of every file taken from it, convert with tf2onnx inside a throwaway venv
(TensorFlow is far too big for the project's own venv), then check the result with
onnxruntime. tf2onnx does not name graph nodes reproducibly, so a rebuilt file can differ in
bytes from the committed one: it is compared by running both on the same input instead.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.detector import DEFAULT_MANIFEST, ModelEntry, file_sha256, load_manifest, sidecar_path

logger = logging.getLogger("build_model")

DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "cwg-model-build"

# tf2onnx's tfjs reader calls np.product, which numpy 2 removed.
_CONVERT = textwrap.dedent(
    """
    import runpy, sys
    import numpy as np
    if not hasattr(np, "product"):
        np.product = np.prod
    sys.argv = ["tf2onnx.convert"] + sys.argv[1:]
    runpy.run_module("tf2onnx.convert", run_name="__main__")
    """
)


class BuildError(Exception):
    """The model could not be rebuilt or did not check out."""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _venv(workdir: Path, requirements: list[str]) -> Path:
    """A conversion venv under workdir, reused while its pinned requirements match."""
    venv = workdir / "venv"
    python = venv / "bin" / "python"
    stamp = venv / "requirements.txt"
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(python), "-m", "pip", "install", "-q", *requirements])
    stamp.write_text(wanted)
    return python


def _fetch_npm(entry: ModelEntry, workdir: Path) -> dict[str, bytes]:
    origin = entry.origin
    spec = f"{origin.package}@{origin.version}"
    name = origin.package.lstrip("@").replace("/", "-") + f"-{origin.version}.tgz"
    tarball = workdir / name
    if not tarball.exists():
        _run(["npm", "pack", spec, "--silent"], cwd=workdir)
    algo, _, b64 = origin.package_digest.partition("-")
    digest = base64.b64encode(hashlib.new(algo, tarball.read_bytes()).digest()).decode()
    if digest != b64:
        raise BuildError(f"{tarball} does not match the npm integrity {origin.package_digest}")
    wanted = {f.path for f in origin.files}
    found: dict[str, bytes] = {}
    # Read only the members named in the manifest: the package holds ~140 MB of other models.
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                fh = tar.extractfile(member)
                if fh is not None:
                    found[member.name] = fh.read()
    return found


def _fetch_pypi(entry: ModelEntry, workdir: Path) -> dict[str, bytes]:
    origin = entry.origin
    dest = workdir / "pypi"
    dest.mkdir(exist_ok=True)
    spec = f"{origin.package}=={origin.version}"
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), spec])
        wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel of {spec} in {dest}, found {wheels}")
    data = wheels[0].read_bytes()
    if _sha256_bytes(data) != origin.package_digest.removeprefix("sha256-"):
        raise BuildError(f"{wheels[0]} does not match sha256 {origin.package_digest}")
    wanted = {f.path for f in origin.files}
    with zipfile.ZipFile(wheels[0]) as zf:
        return {n: zf.read(n) for n in zf.namelist() if n in wanted}


def _convert(entry: ModelEntry, python: Path, src_dir: Path, out: Path) -> None:
    origin = entry.origin
    first = src_dir / Path(origin.files[0].path).name
    args = ["--output", str(out), "--opset", str(origin.opset)]
    if origin.convert == "tf2onnx_tfjs":
        args = ["--tfjs", str(first), *args]
    else:
        args = [
            "--graphdef",
            str(first),
            "--inputs",
            ",".join(origin.graph_inputs),
            "--outputs",
            ",".join(origin.graph_outputs),
            *args,
        ]
    script = src_dir / "convert.py"
    script.write_text(_CONVERT)
    _run([str(python), str(script), *args], cwd=src_dir)


def _check(entry: ModelEntry, built: Path, committed: Path | None) -> None:
    """The new file loads, has the tensors the manifest names and, if an old file exists,
    gives the same outputs on the same input."""
    session = ort.InferenceSession(str(built), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    if entry.input.name not in inputs:
        raise BuildError(f"{built} has inputs {sorted(inputs)}, not {entry.input.name}")
    spec = entry.input
    h, w = spec.height or 300, spec.width or 300
    shape = (1, 3, h, w) if spec.layout == "NCHW" else (1, h, w, 3)
    rng = np.random.default_rng(7)
    if spec.dtype == "uint8":
        feed = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        feed = rng.standard_normal(shape).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    new = session.run(names, {spec.name: feed})
    logger.info("outputs: %s", {n: tuple(o.shape) for n, o in zip(names, new, strict=True)})
    if committed is None or not committed.exists():
        return
    old_session = ort.InferenceSession(str(committed), providers=["CPUExecutionProvider"])
    old = old_session.run(names, {spec.name: feed})
    for name, a, b in zip(names, new, old, strict=True):
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise BuildError(f"output {name} of the rebuilt model differs from {committed}")
    logger.info("rebuilt model gives the same outputs as %s", committed)


def _update_manifest(manifest: Path, model_id: str, sha256: str, size: int) -> None:
    text = manifest.read_text(encoding="utf-8")
    block = re.search(rf"(?ms)^  - id: {re.escape(model_id)}\n.*?(?=^  - id: |\Z)", text)
    if block is None:
        raise BuildError(f"no block for {model_id} in {manifest}")
    part = re.sub(
        r"(?m)^(    sha256: )\"?[0-9a-f]{64}\"?$", rf"\g<1>{sha256}", block.group(0), count=1
    )
    part = re.sub(r"(?m)^(    size_bytes: )\d+$", rf"\g<1>{size}", part, count=1)
    manifest.write_text(text[: block.start()] + part + text[block.end() :], encoding="utf-8")


def build(model_id: str | None, workdir: Path, manifest_path: Path, update: bool) -> Path:
    manifest = load_manifest(manifest_path)
    entry = manifest.get(model_id)
    workdir.mkdir(parents=True, exist_ok=True)
    fetch = _fetch_npm if entry.origin.registry == "npm" else _fetch_pypi
    files = fetch(entry, workdir)
    src_dir = workdir / entry.id
    src_dir.mkdir(exist_ok=True)
    for f in entry.origin.files:
        data = files.get(f.path)
        if data is None:
            raise BuildError(f"{entry.origin.package} has no {f.path}")
        if _sha256_bytes(data) != f.sha256:
            raise BuildError(f"{f.path} has sha256 {_sha256_bytes(data)}, expected {f.sha256}")
        (src_dir / Path(f.path).name).write_bytes(data)
    logger.info("inputs verified: %s", ", ".join(f.path for f in entry.origin.files))
    python = _venv(workdir, entry.origin.converter)
    built = src_dir / entry.file
    _convert(entry, python, src_dir, built)
    target = manifest_path.parent / entry.file
    _check(entry, built, target if target.exists() else None)
    sha, size = file_sha256(built), built.stat().st_size
    if not entry.committed:
        # Not in git: the file lives only here, so its digest goes beside it, not into the
        # manifest every checkout shares.
        shutil.copyfile(built, target)
        sidecar_path(target).write_text(f"{sha}  {entry.file}\n", encoding="ascii")
        logger.info("wrote %s (%d bytes, sha256 %s) and its .sha256", target, size, sha)
    elif update or not target.exists():
        shutil.copyfile(built, target)
        if update:
            _update_manifest(manifest_path, entry.id, sha, size)
        logger.info("wrote %s (%d bytes, sha256 %s)", target, size, sha)
    else:
        logger.info("built %s (%d bytes, sha256 %s); models/ left as it was", built, size, sha)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="model id in the manifest (default: its default)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="downloads + venv")
    parser.add_argument(
        "--update-manifest",
        action="store_true",
        help="copy the new file into models/ and record its sha256 and size in the manifest",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build(args.model, args.workdir, args.manifest, args.update_manifest)
    except BuildError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
