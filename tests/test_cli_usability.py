"""The command line as a new user meets it: help and usage, env, report arguments and plot, the examples'
arguments and outputs, a machine without diffusers, and what the wheel ships."""
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from sage3_diffusers.cli import env_report, main

REPO = Path(__file__).resolve().parent.parent


def _usage_error(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- cli


def test_no_command_lists_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: python -m sage3_diffusers" in err and "arguments are required" not in err
    for command in ("env", "bench", "report"):
        assert f"    {command} " in err
    assert "no command given" in err


def test_bench_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m sage3_diffusers bench")
    for name in ("kernels", "plot", "e2e", "cp"):
        assert f"    {name} " in out
    assert main(["bench"]) == 2
    assert "e2e" in capsys.readouterr().err


def test_bench_subcommand_help_has_its_prog(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m sage3_diffusers bench kernels")


def test_env_help_has_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["env", "--help"])
    out = capsys.readouterr().out
    assert "Versions, GPU" in out and "SAGE3_*" in out


def test_env_lists_backends_once_shows_overrides_and_policies(monkeypatch):
    monkeypatch.setenv("SAGE3_FALLBACK", "garbage")  # env reports it instead of crashing
    monkeypatch.setenv("SAGE3_BACKEND", "sdpa")
    text = env_report()
    assert text.count("reference_fp4          fp4") == 1, text
    assert "at head_dim 64:" in text
    assert "SAGE3_FALLBACK='garbage' is not one of" in text and "INVALID" in text
    assert "  SAGE3_BACKEND=sdpa" in text and "  SAGE3_FALLBACK=garbage" in text
    from sage3_diffusers.integration.policy import bundled_policies
    assert f"bundled policies: {', '.join(bundled_policies())} " in text
    assert {"flux", "sd35", "wan22", "hunyuan_video15"} <= set(bundled_policies())
    monkeypatch.setenv("SAGE3_BACKEND", "garbage")
    assert "  SAGE3_BACKEND=garbage (INVALID: not a backend name or kernel" in env_report()
    monkeypatch.delenv("SAGE3_FALLBACK")
    monkeypatch.delenv("SAGE3_BACKEND")
    assert "active SAGE3_* environment overrides: none" in env_report()


def test_env_build_hint_fits_the_machine(monkeypatch):
    import torch
    monkeypatch.setattr(torch.version, "cuda", None)
    text = env_report()
    assert "setup.py build_ext" not in text
    assert "needs a CUDA build of torch and nvcc" in text
    from sage3_diffusers.backends.base import build_hint
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvcc")
    assert build_hint("sm90", "9.0a").startswith(f"build with: cd {REPO} && SAGE3_EXTENSIONS=sm90 "
                                                 "TORCH_CUDA_ARCH_LIST=9.0a python setup.py build_ext --inplace")


# ---------------------------------------------------------------------------------------------- report


@pytest.mark.parametrize("args,fragment", [
    (["--layers", "0"], "argument --layers: expected an integer >= 1, got 0"),
    (["--batch", "0"], "argument --batch: expected an integer >= 1, got 0"),
    (["--steps", "-2"], "argument --steps: expected an integer >= 1, got -2"),
    (["--steps", "3", "--timestep", "0.5"], "--timestep and --steps > 1 exclude each other"),
    (["--kernel", "fp5"], "unknown kernel 'fp5'"),
])
def test_report_rejects_bad_arguments(capsys, args, fragment):
    from sage3_diffusers.integration.report import main as report_main
    assert fragment in _usage_error(capsys, report_main, ["--model", "flux", "--tiny", *args])


def test_report_without_tiny_fails_at_once_without_gpu_or_cached_weights(capsys, monkeypatch):
    import torch

    from sage3_diffusers.integration import report
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _usage_error(capsys, report.main, ["--model", "flux"])
    assert "runs it on a CUDA GPU, and torch sees none here; use --tiny" in err
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    assert "HF_HUB_OFFLINE is set and the local Hugging Face cache has no black-forest-labs/FLUX.1-dev" in \
        report._check_real_model_runnable("flux")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: "/cache/config.json")
    assert report._check_real_model_runnable("flux") is None


def test_report_plot_writes_a_heat_map_per_layer_and_step(tmp_path, capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    import json

    from PIL import Image

    from sage3_diffusers.integration.report import main as report_main
    png, js = tmp_path / "r.png", tmp_path / "r.json"
    assert report_main(["--model", "flux", "--tiny", "--kernel", "int8_fp8", "--steps", "3", "--layers", "1",
                        "--batch", "1", "--json", str(js), "--plot", str(png)]) == 0
    data = json.loads(js.read_text())
    steps = data["kernels"]["int8_fp8"]["steps"]
    assert [s["timestep"] for s in steps] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert len({tuple(r["isolated"]["cos_sim"] for r in s["layers"]) for s in steps}) == 3  # timesteps differ
    assert data["kernels"]["int8_fp8"]["layers"] == steps[0]["layers"]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 100
    assert f"wrote {png}" in capsys.readouterr().out


def test_report_plot_without_matplotlib_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", "--model", "flux", "--tiny", "--plot", "x.png"]) == 1
    err = capsys.readouterr().err
    assert "report --plot needs matplotlib" in err and "pip install matplotlib" in err


# ---------------------------------------------------------------------------------------------- examples


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import _common
    return _common


def test_example_help_names_the_bundled_policy(common, capsys):
    with pytest.raises(SystemExit):
        common.parse_args("flux", ["--help"])
    out = capsys.readouterr().out
    assert "%(prog)s" not in out and "flux.py one" not in out and "configs/" not in out
    assert "default: flux, the bundled flux policy" in " ".join(out.split())


@pytest.mark.parametrize("args,fragment", [
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["--steps", "-1"], "argument --steps: expected an integer >= 1, got -1"),
    (["--kernel", "nonsense"], "argument --kernel: unknown kernel 'nonsense'; allowed: auto, fp4, int8_fp8, sdpa"),
    (["--policy", "nope"], "--policy: policy 'nope': not a bundled policy"),
])
def test_example_rejects_bad_arguments(common, capsys, args, fragment):
    assert fragment in _usage_error(capsys, common.parse_args, "flux", args)


EXAMPLE_SCRIPTS = sorted(p for p in (REPO / "examples").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS, ids=lambda p: p.stem)
def test_every_example_validates_its_arguments(common, capsys, script):
    """Each example (the newer families' too) runs through `_common.run` with its registry family, whose
    bundled policy is its default, and gets the same argparse checks."""
    import re

    from sage3_diffusers.integration import models
    from sage3_diffusers.integration.policy import bundled_policies
    family, = re.findall(r'run\("(\w+)"\)', script.read_text())
    assert family == script.stem and models.find(family) is not None and family in bundled_policies()
    assert common.parse_args(family, []).policy == family
    assert "argument --steps: expected an integer >= 1, got 0" in _usage_error(
        capsys, common.parse_args, family, ["--steps", "0"])
    assert "argument --kernel: unknown kernel 'nonsense'" in _usage_error(
        capsys, common.parse_args, family, ["--kernel", "nonsense"])


def test_example_without_a_tiny_pipeline_says_so(common, capsys):
    from sage3_diffusers.integration import models
    no_tiny = [f.name for f in models.families() if f.tiny_pipeline is None
               and (REPO / "examples" / f"{f.name}.py").exists()]
    assert "ltx2" in no_tiny
    for family in no_tiny:
        assert f"--tiny: the {family} family has no tiny pipeline" in _usage_error(
            capsys, common.parse_args, family, ["--tiny"])


def test_example_compile_on_cpu_says_it_takes_a_while(common, monkeypatch, tmp_path, capsys):
    pytest.importorskip("diffusers")
    import torch

    import sage3_diffusers
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the message, not the compile, is under test
    try:
        assert common.run("sd35", ["--tiny", "--compile", "--steps", "1", "--out", str(tmp_path)]) == 0
    finally:
        sage3_diffusers.set_fallback(None)
    out = capsys.readouterr().out
    assert "torch.compile on CPU: compiling takes a minute or more" in out


def _video_result():
    from PIL import Image
    return SimpleNamespace(frames=[[Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(3)]])


def test_video_is_gif_with_a_hint_without_the_video_extra(common, monkeypatch, tmp_path, capsys):
    pytest.importorskip("diffusers")
    import sage3_diffusers.extras as extras
    real = extras.available
    monkeypatch.setattr(extras, "available", lambda m: False if m == "imageio_ffmpeg" else real(m))
    path = common.save("mochi", _video_result(), tmp_path, "t")
    assert path.suffix == ".gif" and path.stat().st_size > 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and 'pip install "sage3-diffusers[video]"' in out


def test_video_is_mp4_with_the_video_extra(common, tmp_path, capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("imageio_ffmpeg")
    path = common.save("mochi", _video_result(), tmp_path, "t")
    assert path.suffix == ".mp4" and path.stat().st_size > 0 and capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- no diffusers

_NO_DIFFUSERS = r"""
import io, runpy, sys, warnings
from contextlib import redirect_stderr
sys.modules["diffusers"] = None  # as if diffusers were not installed
warnings.simplefilter("error")   # any warning (e.g. about registering dispatcher backends) fails
import sage3_diffusers
apply = sage3_diffusers.apply
try:
    apply(object())
except ImportError as e:
    print("APPLY:", e)
from sage3_diffusers.cli import main
err = io.StringIO()
with redirect_stderr(err):
    rc = main(["report", "--model", "flux", "--tiny"])
print("REPORT:", rc, err.getvalue().strip())
sys.path.insert(0, "examples")
sys.argv = ["examples/flux.py", "--tiny"]
err = io.StringIO()
with redirect_stderr(err):
    try:
        runpy.run_path("examples/flux.py", run_name="__main__")
    except SystemExit as e:
        print("EXAMPLE:", e.code, err.getvalue().strip())
from sage3_diffusers.cli import env_report
print("ENV:", [l for l in env_report().splitlines() if l.startswith("diffusers")][0])
"""


def test_without_diffusers_every_entry_point_says_how_to_install():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _NO_DIFFUSERS], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hint = 'pip install "sage3-diffusers[diffusers]"'
    lines = {line.split(":", 1)[0]: line for line in r.stdout.splitlines() if ":" in line}
    assert "sage3_diffusers.apply needs diffusers" in lines["APPLY"] and hint in lines["APPLY"]
    assert lines["REPORT"].startswith("REPORT: 1 ") and "report needs diffusers" in lines["REPORT"]
    assert hint in lines["REPORT"]
    assert lines["EXAMPLE"].startswith("EXAMPLE: 1 ") and "examples/flux.py needs diffusers" in lines["EXAMPLE"]
    assert "diffusers: not installed" in lines["ENV"] and hint in lines["ENV"]
    assert "Traceback" not in r.stderr and "RuntimeWarning" not in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- packaging


def test_wheel_ships_the_bundled_policies(tmp_path):
    """The wheel (a non-editable install) holds configs/*.yaml, so `apply(pipe, "flux")` works outside the repo."""
    import shutil
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "sage3_diffusers", src / "sage3_diffusers",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, SAGE3_SKIP_CUDA_BUILD="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("sage3_diffusers-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).stem for n in names if n.startswith("sage3_diffusers/configs/") and n.endswith(".yaml")}
    from sage3_diffusers.integration import models
    from sage3_diffusers.integration.policy import bundled_policies
    assert shipped == set(bundled_policies()) and "flux" in shipped
    # A policy for every family with an example (the newer families included), the registry's modules, and
    # the measured speed tables.
    with_example = {p.stem for p in (REPO / "examples").glob("*.py") if not p.name.startswith("_")}
    assert with_example <= shipped and {"wan22", "qwenimage", "ltx", "flux2", "hunyuan_video15"} <= with_example
    assert {f"sage3_diffusers/integration/models/{m}.py" for m in ("__init__", "wan", "ltx")} <= names
    assert {n for n in names if n.startswith("sage3_diffusers/data/perf/") and n.endswith(".json")} == \
        {f"sage3_diffusers/data/perf/{p.name}" for p in (REPO / "sage3_diffusers" / "data" / "perf").glob("*.json")}
    assert "sage3_diffusers/extras.py" in names


def test_virtualenv_from_the_readme_is_ignored_by_git():
    import shutil
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", ".venv/bin/python"], cwd=REPO)
    assert r.returncode == 0, ".venv/ (README's set-up commands create it) must be in .gitignore"
