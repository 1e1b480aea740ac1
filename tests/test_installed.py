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
                   "helios_triton/stage.py", "helios_triton/bls.py",
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
