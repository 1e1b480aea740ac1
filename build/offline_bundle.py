"""Build an offline bundle: what a GPU host without internet needs to serve and measure Helios.

    python build/offline_bundle.py --out .offline                 # for Python 3.12 hosts
    python build/offline_bundle.py --out .offline --python 3.11

The host is assumed to have PyTorch with CUDA (as NVIDIA's PyTorch images and most GPU hosts
do) but neither Triton nor this project. The bundle holds:

- ``tritonserver.tar.xz``: tritonserver 2.51 from the ``nvidia-pytriton`` wheel installed
  here, laid out as NVIDIA's images lay it out (``bin/``, ``lib/``, ``backends/python/``), so
  that ``TRITONSERVER_HOME`` points at it; only the shared libraries that the server, the
  python backend and the stub of the host's Python load are taken;
- ``wheels/``: this project and its client as wheels, and the pinned packages that the host
  lacks or has in a version the server cannot use (numpy < 2: tritonserver 2.51's python
  backend corrupts BYTES tensors under numpy 2), for the host's Python and platform;
  tritonclient without its perf_analyzer binaries (13 MB the measurement does not use);
- ``install.sh``: makes a virtual environment on the host whose own packages are these
  wheels, with the host's packages (torch, ...) behind them, and unpacks the server.

``--flash-attention DIR`` builds a second, optional bundle: FlashAttention-4 (``flash_attn.cute``,
which ``helios.attention`` runs on Hopper and Blackwell GPUs where it is installed) with
CUTLASS's Python DSL and their other needs, unpacked into one folder and packed as
``site.tar.xz`` in parts of at most ``--part-mib`` MiB (``site.tar.xz.00``, ``.01``, ...), since
CUTLASS's compiler library alone is larger than one copy to a lent GPU machine may be. Its
``install.sh`` joins the parts and unpacks them; ``benchmarks/gpu.sh`` installs it when it finds
``.offline-flash/install.sh`` and every part beside it.

On the host: ``bash .offline/install.sh /tmp/helios-env`` then
``source /tmp/helios-env/activate.sh``; ``benchmarks/gpu.sh`` does both itself when it finds
the bundle. The bundle is built for the newest pins of requirements.txt and must stay within
what one copy to the host can carry (the lent GPU machines take 64 MiB with the source tree);
the script prints its size.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Packages the GPU host gets from the bundle, pinned as in requirements.txt.
HOST_PACKAGES = ("numpy", "tritonclient", "python-rapidjson")
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def pins() -> dict[str, str]:
    """{package: '==version'} from requirements.txt."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?(==[^\s#]+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def server_files(python: str) -> dict[str, Path]:
    """{path in the bundle: file here} of the tritonserver of the installed nvidia-pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-pytriton is not installed here: run `make setup` first")
    server = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    libs = server.parent.parent / "nvidia_pytriton.libs"
    stub = server / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"the wheel has no python-backend stub for Python {python}")
    files = {"bin/tritonserver": server / "bin" / "tritonserver",
             "backends/python/libtriton_python.so": server / "backends/python/libtriton_python.so",
             "backends/python/triton_python_backend_utils.py":
                 server / "backends/python/triton_python_backend_utils.py",
             "backends/python/triton_python_backend_stub": stub}
    # The wheel's own libraries that these load, found by the dynamic loader (ldd).
    env = dict(os.environ, LD_LIBRARY_PATH=str(libs))
    for binary in list(files.values()):
        out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True).stdout
        for path in re.findall(r"=> (\S+)", out):
            p = Path(path)
            if p.parent.resolve() == libs.resolve():
                files[f"lib/{p.name}"] = p
    return files


def write_server(out: Path, python: str) -> Path:
    target = out / "tritonserver.tar.xz"
    with tarfile.open(target, "w:xz", preset=9) as tar:
        for name, path in sorted(server_files(python).items()):
            tar.add(path, arcname=f"tritonserver/{name}")
    return target


def without_perf_binaries(wheel: Path) -> None:
    """Rewrite tritonclient's wheel without bin/perf_analyzer and bin/perf_client (and their
    RECORD lines), which the measurement does not use."""
    drop = re.compile(r"(^|/)bin/perf_(analyzer|client)$")
    buf = io.BytesIO()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.search(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(True)
                               if not drop.search(line.split(",")[0])).encode()
            dst.writestr(item, data)
    wheel.write_bytes(buf.getvalue())


def project_wheels(wheels: Path) -> None:
    """This project and its client as wheels: pure Python, built here from a copy of their
    sources (setuptools builds in the source folder, and build/ is this folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
        for name in ("helios", "helios_triton", "client"):
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        shutil.copy2(ROOT / "pyproject.toml", src)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(wheels), str(src), str(src / "client")],
                       check=True)


def write_wheels(out: Path, python: str) -> Path:
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pin = pins()
    want = [f"{name}{pin[name]}" for name in HOST_PACKAGES if name in pin] + \
        [name for name in HOST_PACKAGES if name not in pin]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", python, "--implementation",
                    "cp", *plat, "-d", str(wheels), *want], check=True)
    for wheel in wheels.glob("tritonclient-*.whl"):
        without_perf_binaries(wheel)
    project_wheels(wheels)
    return wheels


# FlashAttention-4 and what it needs beyond the host's packages (torch, cuda-bindings, einops),
# at the versions measured with (docs/performance.md); CUDA 13 builds of CUTLASS's compiler.
FLASH_PACKAGES = ("flash-attn-4==4.0.0b36", "nvidia-cutlass-dsl==4.8.1",
                  "nvidia-cutlass-dsl-libs-base==4.8.1", "nvidia-cutlass-dsl-libs-core==4.8.1",
                  "nvidia-cutlass-dsl-libs-cu13==4.8.1", "apache-tvm-ffi==0.1.15.post2",
                  "torch-c-dlpack-ext==0.1.5", "quack-kernels==0.6.5")

FLASH_INSTALL = r"""#!/usr/bin/env bash
# Unpack FlashAttention-4 and CUTLASS's Python DSL into DIR: bash install.sh DIR
# DIR is then a site folder: add it with site.addsitedir (its .pth files put CUTLASS's DSL
# on the path), as benchmarks/gpu.sh does through EXTRA_SITE.
set -euo pipefail
dir="${1:?usage: install.sh DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
n=$(cat "$here/parts")
shopt -s nullglob
found=("$here"/site.tar.xz.[0-9][0-9])
[ "${#found[@]}" -eq "$n" ] || {
    echo "install.sh: ${#found[@]} of $n parts of site.tar.xz here" >&2; exit 1; }
mkdir -p "$dir"
cat "${found[@]}" | tar -xJf - -C "$dir"
echo "FlashAttention-4 unpacked in $dir"
"""


def write_flash(out: Path, python: str, part_mib: int) -> None:
    """The optional FlashAttention-4 bundle (module docstring): the wheels of FLASH_PACKAGES
    for the host, unpacked together (the CUTLASS wheels share one top folder), without the
    libraries for other processors, packed and split."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", python, "--implementation",
                        "cp", *plat, "-d", str(wheels), *FLASH_PACKAGES], check=True)
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
        for stubs in site.glob("nvidia_cutlass_dsl/*/lib/stubs"):  # aarch64 and QNX builds
            shutil.rmtree(stubs)
        print("packing FlashAttention-4 (xz, a few minutes) ...", file=sys.stderr, flush=True)
        pack_site(site, out, part_mib << 20)


def pack_site(site: Path, out: Path, part_bytes: int) -> int:
    """``site`` packed as OUT/site.tar.xz.NN, parts of at most ``part_bytes``, with their
    count in OUT/parts and the ``install.sh`` that joins and unpacks them; returns the count."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=6) as tar:
        for path in sorted(site.iterdir()):
            tar.add(path, arcname=path.name)
    data = buf.getvalue()
    parts = [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)]
    for i, part in enumerate(parts):
        (out / f"site.tar.xz.{i:02d}").write_bytes(part)
    (out / "parts").write_text(f"{len(parts)}\n")
    (out / "install.sh").write_text(FLASH_INSTALL)
    return len(parts)


INSTALL = r"""#!/usr/bin/env bash
# Install this bundle on a host without internet: bash install.sh ENV_DIR
# ENV_DIR gets a venv whose own packages are the bundle's wheels, with the host's packages
# (torch, ...) behind them, and tritonserver unpacked in ENV_DIR/tritonserver.
# Then: source ENV_DIR/activate.sh
set -euo pipefail
env_dir="${1:?usage: install.sh ENV_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
host_site="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
python3 -m venv --without-pip "$env_dir"
own="$("$env_dir/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$own" "$here"/wheels/*.whl
echo "$host_site" > "$own/host-packages.pth"
ln -sf "$own"/bin/* "$env_dir/bin/" 2>/dev/null || true
tar -xJf "$here/tritonserver.tar.xz" -C "$env_dir"
cat > "$env_dir/activate.sh" <<EOF
export PATH="$env_dir/bin:\$PATH"
export TRITONSERVER_HOME="$env_dir/tritonserver"
EOF
"$env_dir/bin/python" -c 'import numpy, torch, helios, helios_triton, helios_client; print("helios env: numpy", numpy.__version__, "torch", torch.__version__)'
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".offline")
    ap.add_argument("--python", default="3.12", help="the GPU host's Python (major.minor)")
    ap.add_argument("--project-wheels-only", action="store_true",
                    help="only this project's and its client's wheels, into OUT")
    ap.add_argument("--flash-attention", type=Path, default=None, metavar="DIR",
                    help="build the optional FlashAttention-4 bundle into DIR instead")
    ap.add_argument("--part-mib", type=int, default=40,
                    help="the largest part of the FlashAttention-4 bundle, MiB (default 40)")
    args = ap.parse_args(argv)
    if args.flash_attention:
        write_flash(args.flash_attention, args.python, args.part_mib)
        report(args.flash_attention)
        return 0
    if args.project_wheels_only:
        args.out.mkdir(parents=True, exist_ok=True)
        project_wheels(args.out)
        return 0
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    print(f"server files for Python {args.python} ...", file=sys.stderr, flush=True)
    write_server(args.out, args.python)
    print("wheels ...", file=sys.stderr, flush=True)
    write_wheels(args.out, args.python)
    (args.out / "install.sh").write_text(INSTALL)
    report(args.out)
    return 0


def report(out: Path) -> None:
    """Every file of a bundle with its size, and the total."""
    total = 0
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        size = path.stat().st_size
        total += size
        print(f"{size / 2**20:8.1f} MiB  {path.relative_to(out)}")
    print(f"{total / 2**20:8.1f} MiB  in all ({out})")


if __name__ == "__main__":
    sys.exit(main())
