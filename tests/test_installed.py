"""The package as `pip install .` installs it, away from the source tree: every subpackage is
in the wheel (the attention kernel, the Triton glue, export, training), and each imports from
the installed copy."""

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_an_installed_helios_has_its_kernels_and_triton_glue(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "build" / "offline_bundle.py"),
                    "--project-wheels-only", "--out", str(tmp_path / "wheels")],
                   check=True, timeout=300)
    (wheel,) = (tmp_path / "wheels").glob("helios-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("helios/kernels/context_attention.py", "helios/attention.py",
                   "helios_triton/stage.py", "helios_triton/stub.py", "helios_triton/bls.py",
                   "helios_triton/fill_repository.py", "helios_triton/server.py",
                   "helios/export/onnx_export.py", "helios/export/trt_context_attention.py",
                   "helios/training/trainer.py", "helios/settings.py"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "benchmarks/", "model_repository")) for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    # From a folder outside the tree, the installed copy is the one imported. The kernel
    # module needs the triton package, which a CPU install of torch lacks, so it is found
    # rather than imported; the rest is imported.
    check = ("import importlib.util, helios.attention, helios_triton.stage, helios.training.trainer;"
             "spec = importlib.util.find_spec('helios.kernels.context_attention');"
             "print(spec.origin); print(helios_triton.stage.__file__);"
             "print(helios.training.trainer.__file__)")
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True,
                         text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in out.stdout.split():
        assert line.startswith(str(site)), line


def test_the_flash_attention_bundle_joins_its_parts_and_refuses_a_missing_one(tmp_path):
    """build/offline_bundle.py --flash-attention packs a site folder in parts small enough for
    one copy each; its install.sh unpacks them joined, and says how many it found when one
    did not travel."""
    import os
    import random

    sys.path.insert(0, str(ROOT / "build"))
    from offline_bundle import pack_site

    site, out = tmp_path / "site", tmp_path / "bundle"
    (site / "pkg").mkdir(parents=True)
    out.mkdir()
    blob = random.Random(0).randbytes(5000)   # incompressible: several parts of 2 KiB
    (site / "pkg" / "blob.bin").write_bytes(blob)
    (site / "pkg.pth").write_text("import pkg\n")
    n = pack_site(site, out, 2048)
    assert n == len(list(out.glob("site.tar.xz.*"))) >= 3

    def install(dest):
        run = subprocess.run(["bash", str(out / "install.sh"), str(tmp_path / dest)],
                             capture_output=True, text=True, timeout=60)
        return run.returncode, run.stderr.strip()

    code, err = install("unpacked")
    assert code == 0, err
    assert (tmp_path / "unpacked" / "pkg" / "blob.bin").read_bytes() == blob
    assert (tmp_path / "unpacked" / "pkg.pth").read_text() == "import pkg\n"
    os.remove(out / "site.tar.xz.01")
    assert install("again") == (1, f"install.sh: {n - 1} of {n} parts of site.tar.xz here")
    for part in out.glob("site.tar.xz.*"):
        os.remove(part)
    assert install("again") == (1, f"install.sh: 0 of {n} parts of site.tar.xz here")
