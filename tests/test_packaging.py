"""The declared torch range (pyproject.toml, requirements.txt) is the one the code needs: its minimum is the newest
first release among the torch APIs the code calls, as recorded in TORCH_APIS."""
import re
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["lm_human_preferences", "launch.py", "params.py", "benchmarks", "saved_models", "datasets"]

# Newer torch APIs, as a regex over the source -> the first torch release that has them. An API that is not listed
# is in torch 2.0 (and this list holds every later one the project has called or is likely to call).
TORCH_APIS = {
    r"torch\.is_autocast_enabled\(\s*[^)\s]": "2.4",  # with a device_type argument (language/fused.py)
    r"torch\.get_autocast_dtype\(": "2.4",  # language/fused.py
    r"torch\.compiler\.is_compiling\(": "2.3",  # language/fused.py
    r"\bdevice_id\s*=": "2.3",  # init_process_group(device_id=...)
    r"torch\.nn\.attention\.sdpa_kernel|\bsdpa_kernel\(": "2.3",
    r"torch\.amp\.GradScaler\(": "2.3",
    r"torch\.amp\.custom_(fwd|bwd)\(": "2.4",
    r"torch\.serialization\.add_safe_globals\(": "2.4",
    r"torch\.library\.custom_op\b": "2.4",
    r"\bF\.rms_norm\(|functional\.rms_norm\(|nn\.RMSNorm\b": "2.4",
    r"\benable_gqa\s*=": "2.5",
    r"\bnn\.Buffer\(": "2.5",
    r"torch\.serialization\.safe_globals\(": "2.5",
    r"flex_attention": "2.5",
    r"torch\.accelerator\.": "2.6",
}


def version(text: str) -> tuple:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", text).groups())


def declared_torch(requirements: list) -> str:
    """The minimum of the one `torch>=X.Y` requirement among `requirements` (strings)."""
    found = [re.fullmatch(r"torch\s*>=\s*([\d.]+)", r.split("#")[0].strip()) for r in requirements]
    found = [m.group(1) for m in found if m]
    assert len(found) == 1, f"expected one torch>=X.Y requirement, found {found}"
    return found[0]


def used_apis() -> dict:
    """{regex: (first release, a file that uses it)} for every TORCH_APIS entry the source matches."""
    files = [p for name in SOURCES for p in ([ROOT / name] if name.endswith(".py") else (ROOT / name).rglob("*.py"))]
    used = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        for pattern, release in TORCH_APIS.items():
            if pattern not in used and re.search(pattern, text):
                used[pattern] = (release, path.relative_to(ROOT).as_posix())
    return used


def test_the_declared_minimum_is_what_the_code_needs():
    pyproject = declared_torch(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    requirements = declared_torch((ROOT / "requirements.txt").read_text().splitlines())
    assert pyproject == requirements
    used = used_apis()
    needed = max((version(release) for release, _ in used.values()), default=(2, 0))
    too_new = {p: u for p, u in used.items() if version(u[0]) > version(pyproject)}
    assert not too_new, f"torch>={pyproject} is declared, but the code calls {too_new}: raise the minimum"
    assert version(pyproject) == needed, f"torch>={pyproject} is declared, but the code needs only {needed}: {used}"
    assert version(torch.__version__) >= version(pyproject)


@pytest.mark.parametrize("code, release", [("torch.is_autocast_enabled('cuda')", "2.4"),
                                           ("torch.is_autocast_enabled()", None),
                                           ("torch.get_autocast_dtype(device)", "2.4"),
                                           ("if torch.compiler.is_compiling():", "2.3"),
                                           ("init_process_group(backend, device_id=dev)", "2.3"),
                                           ("DDP(m, device_ids=[0])", None),
                                           ("x = nn.Buffer(t)", "2.5"),
                                           ("torch.accelerator.current_accelerator()", "2.6")])
def test_the_api_table_recognises_its_spellings(code, release):
    matches = [r for p, r in TORCH_APIS.items() if re.search(p, code)]
    assert matches == ([release] if release else [])


def test_the_apis_the_code_calls_exist_in_this_torch():
    assert torch.is_autocast_enabled("cpu") is False and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    assert torch.compiler.is_compiling() is False
