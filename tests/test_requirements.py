"""The dependency files tell the truth: the lock is complete and pinned, the floors file is pyproject.toml's lower
bounds, and requirements-colab.txt installs on Colab exactly what its recorded image (docs/colab-preinstalled.txt)
lacks or has too old, each line with its reason, never torch."""

import importlib.metadata as md
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NEVER_ON_COLAB = {"torch", "torchvision", "torchaudio", "triton"}  # the runtime's own CUDA build stays
# Colab's GPU image: Python 3.12 on x86_64 Linux
COLAB_ENV = {"python_version": "3.12", "python_full_version": "3.12.11", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def pins(path: Path) -> dict[str, tuple[str, str]]:
    """{name: (version, the line's comment)} of a `name==version  # why` file."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s#]+)\s*(?:#\s*(.*))?", line.strip())
        assert m, f"{path.name}: {line!r} is not `name==version  # comment`"
        out[canonicalize_name(m[1])] = (m[2], m[3] or "")
    return out


def requirements(extras=("gpu", "test")) -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    return reqs + [Requirement(r) for e in extras for r in PYPROJECT["optional-dependencies"][e]]


LOCK = pins(ROOT / "requirements-lock.txt")
FLOORS = pins(ROOT / "requirements-floors.txt")
COLAB = {k: v for k, (v, _) in pins(ROOT / "docs" / "colab-preinstalled.txt").items()}
# "# requires name==version: req; req": what Colab's own packages require (their METADATA), where the pins touch it
COLAB_REQUIRES = {canonicalize_name(m[1]): (m[2], [Requirement(r) for r in m[3].split("; ")]) for m in re.finditer(
    r"^# requires ([\w.\-]+)==(\S+): (.+)$", (ROOT / "docs" / "colab-preinstalled.txt").read_text(), re.M)}
COLAB_PINS = pins(ROOT / "requirements-colab.txt")


def test_the_lock_pins_every_dependency_in_range_and_leaves_torch_to_setup():
    for req in requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in LOCK  # tools/setup.sh installs it first (a CUDA build stays)
            continue
        assert name in LOCK and req.specifier.contains(LOCK[name][0]), f"{req}: lock has {LOCK.get(name)}"
    assert not [n for n in LOCK if n in NEVER_ON_COLAB or n.startswith(("nvidia-", "cuda-"))]
    assert len(LOCK) > 60  # the transitive packages too, not only the direct ones
    setup = (ROOT / "tools" / "setup.sh").read_text()
    assert "-r requirements-lock.txt" in setup and "torch==2.13.0" in setup


def test_every_floor_is_the_version_the_floors_check_installs():
    """pyproject.toml's lower bounds are exactly requirements-floors.txt's pins (tools/check_floors.sh runs the
    unit tests with them; its last result is in docs/dependencies.md). torch is the one untested floor."""
    for req in requirements(extras=("gpu",)):
        name = canonicalize_name(req.name)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert lower, f"{req}: every dependency needs a tested lower bound (>=)"
        if name == "torch":
            continue
        assert name in FLOORS and Version(FLOORS[name][0]) == Version(lower[0]), \
            f"{req}: floors file has {FLOORS.get(name)}; run `bash tools/check_floors.sh --compile`"


def after_colab_install() -> dict[str, str]:
    return {**COLAB, **{k: v for k, (v, _) in COLAB_PINS.items()}}


def test_colab_pins_are_the_tested_versions_with_a_reason_and_never_torch():
    for name, (version, why) in COLAB_PINS.items():
        assert name not in NEVER_ON_COLAB, f"{name}: never replace the runtime's own torch/CUDA"
        assert LOCK.get(name, (None,))[0] == version, f"{name}=={version}: the lock (tested) has {LOCK.get(name)}"
        assert len(why) > 15, f"{name}: say why Colab's {COLAB.get(name, '(none)')} does not do"


def needed_on_colab() -> dict[str, str]:
    """What must be pinned, and why: missing from Colab or below the kit's range; or needed, at another version
    than Colab's, by a pinned package (its metadata read where this venv has the pinned version)."""
    after, need = after_colab_install(), {}
    for req in requirements(extras=("gpu",)) + [Requirement("papermill")]:  # papermill: notebook 07's sweep
        name = canonicalize_name(req.name)
        if name in NEVER_ON_COLAB:
            continue
        if name not in COLAB:
            need[name] = "missing"
        elif not req.specifier.contains(COLAB[name], prereleases=True):
            need[name] = f"Colab's {COLAB[name]} is outside {req.specifier}"
    for pinned, (version, _) in COLAB_PINS.items():
        try:
            if md.version(pinned) != version:
                continue
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, md.requires(pinned) or []):
            name = canonicalize_name(r.name)
            if (r.marker and not r.marker.evaluate(COLAB_ENV)) or name in NEVER_ON_COLAB or name not in COLAB:
                continue  # absent from Colab: pip installs it (what is new there is listed in requirements-colab.txt)
            if not r.specifier.contains(COLAB[name], prereleases=True):
                need[name] = f"{pinned}=={version} needs {r}"
                assert r.specifier.contains(after.get(name, "0"), prereleases=True), \
                    f"{pinned}=={version} needs {r}, Colab has {COLAB[name]}: pin {name} in requirements-colab.txt"
    for kept, (version, reqs) in COLAB_REQUIRES.items():
        assert COLAB.get(kept) == version, f"docs/colab-preinstalled.txt: {kept}'s requirements are of {version}"
        broken = [str(r) for r in reqs if not r.specifier.contains(after.get(canonicalize_name(r.name), "0"), True)]
        if broken:
            need[kept] = f"Colab's {kept}=={version} requires {', '.join(broken)}"
    return need


def unreadable_pins() -> list[str]:
    """Pins whose metadata this venv cannot give (another version installed, e.g. in the floors venv)."""
    def installed(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None
    return [n for n, (v, _) in COLAB_PINS.items() if installed(n) != v]


def test_colab_gets_what_it_lacks_and_nothing_it_has():
    need = needed_on_colab()
    assert sorted(set(need) - set(COLAB_PINS)) == [], f"requirements-colab.txt must pin: {need}"
    if unreadable_pins():
        pytest.skip(f"this venv has other versions of {unreadable_pins()} than requirements-colab.txt, so what they "
                    "need cannot be read here (the lock's venv checks it)")
    extra = sorted(set(COLAB_PINS) - set(need))
    assert extra == [], f"{extra}: Colab's own versions do (within the tested floors); leave them out"


@pytest.mark.parametrize("name", ["diffusers", "transformers", "peft", "huggingface-hub", "safetensors"])
def test_colab_list_is_recorded_with_its_source_and_date(name):
    text = (ROOT / "docs" / "colab-preinstalled.txt").read_text()
    assert "googlecolab/backend-info" in text and re.search(r"20\d\d-\d\d-\d\d", text)
    assert name in COLAB
