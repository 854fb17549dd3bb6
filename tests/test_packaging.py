"""What a user and the Comfy Registry see of the pack: pyproject.toml as ComfyUI's own
``comfy_config`` parser reads it, the LICENSE, the templates' thumbnails, and README (its two
commands, its pictures, and node names that match the node menu's)."""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from PIL import Image

from comfy_host import comfyui_path, import_comfy

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# what README renders: HTML comments (the marked place for new nodes) are not shown
SHOWN = re.sub(r"<!--.*?-->", "", README, flags=re.S)
TEMPLATES = REPO / "example_workflows"
# What frontend 1.32.9 (ComfyUI 0.3.75's pin) asks for as a custom-node template's card:
# mediaType "image", mediaSubtype "jpg", at /api/workflow_templates/<pack>/<name>.jpg.
THUMBNAIL_SUFFIX = ".jpg"
REWARD_FOLDERS = {"dno_rewards", "clip_vision", "clip"}
# The [tool.comfy] keys comfy_config reads: ComfyConfig's aliases plus requires-comfyui.
TOOL_COMFY_KEYS = {"PublisherId", "DisplayName", "Icon", "Models", "includes", "web", "banner_url",
                   "requires-comfyui"}


# --------------------------------------------------------------------------- pyproject.toml

@pytest.fixture(scope="module")
def config():
    """pyproject.toml through the host's comfy_config parser (what ComfyUI runs at start-up, and
    the registry tooling's own types)."""
    root = str(comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    parser = importlib.import_module("comfy_config.config_parser")
    return parser.extract_node_configuration(str(REPO))


@pytest.fixture(scope="module")
def raw_toml():
    try:
        import tomllib
    except ImportError:             # Python 3.10: the same parser as the tomli package
        import tomli as tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_parser_reads_our_project(config):
    project = config.project
    assert project.name == "comfyui-dno"
    assert re.fullmatch(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", project.name) and len(project.name) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.version), "the registry wants X.Y.Z"
    assert project.description.startswith("Direct Noise Optimization")
    assert project.requires_python == ">=3.10"


def test_license_is_the_mit_file(config, raw_toml):
    assert config.project.license.file == "LICENSE" and not config.project.license.text
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert "License :: OSI Approved :: MIT License" in raw_toml["project"]["classifiers"]


def test_repository_publisher_and_icon(config):
    urls, comfy = config.project.urls, config.tool_comfy
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", urls.repository), urls.repository
    assert urls.issues == urls.repository + "/issues"
    assert urls.documentation.startswith(urls.repository)
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy.publisher_id), comfy.publisher_id
    assert comfy.display_name == "DNO: Direct Noise Optimization"
    # the icon is a file of this repository, at its raw URL on the main branch
    owner_repo = urls.repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert comfy.icon.startswith(prefix), comfy.icon
    icon = Image.open(REPO / comfy.icon.removeprefix(prefix))
    assert icon.format == "PNG" and icon.size[0] == icon.size[1] <= 400  # square, registry-sized


def test_comfyui_and_frontend_versions(config):
    project = config.project
    assert project.supported_comfyui_version == ">=0.3.75"
    host = re.search(r'__version__ = "([\d.]+)"', (comfyui_path() / "comfyui_version.py").read_text()).group(1)
    assert Version(host) in SpecifierSet(project.supported_comfyui_version), "the tested host must satisfy it"
    assert project.supported_comfyui_frontend_version == ">=1.32.9"
    pinned = re.search(r'FRONTEND="comfyui-frontend-package==([\d.]+)"',
                       (REPO / "tests" / "setup_browser.sh").read_text()).group(1)
    assert Version(pinned) in SpecifierSet(project.supported_comfyui_frontend_version), \
        "the frontend the browser tests run on must satisfy it"


def test_os_and_accelerator_classifiers_are_ones_the_registry_accepts(config, raw_toml):
    # the parser returns [] when any classifier of a kind is not one it knows
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    environment = [c for c in raw_toml["project"]["classifiers"] if c.startswith("Environment ::")]
    assert len(environment) == len(config.project.supported_accelerators)


def test_dependencies_are_requirements_txt_plus_the_frontend(config):
    listed = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    deps = [d for d in config.project.dependencies if not d.startswith("comfyui-frontend-package")]
    assert deps == listed
    assert not any(Requirement(d).name == "torch" for d in config.project.dependencies)


def requirement_lines(name: str) -> list[Requirement]:
    return [Requirement(line) for line in (REPO / name).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "-r"))]


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-demo.txt", "requirements-diffusers.txt"])
def test_user_requirements_keep_the_users_torch(name):
    """A user installs these inside ComfyUI's environment: a torch or torchvision pin (or upper
    bound) would replace the torch ComfyUI runs on. Only requirements-test.txt pins them."""
    for req in requirement_lines(name):
        if req.name.lower() in ("torch", "torchvision"):
            capped = [s for s in req.specifier if s.operator in ("==", "===", "~=", "<", "<=", "!=")]
            assert not capped, f"{name}: {req} pins {req.name}; leave the user's {req.name} in place"
    pinned = {r.name.lower(): r for r in requirement_lines("requirements-test.txt")}
    assert any(s.operator == "==" for s in pinned["torch"].specifier), pinned["torch"]


def test_every_tool_comfy_key_is_one_the_parser_reads(raw_toml):
    """pydantic ignores unknown keys: a misspelt one would vanish without an error."""
    assert set(raw_toml["tool"]["comfy"]) <= TOOL_COMFY_KEYS, set(raw_toml["tool"]["comfy"]) - TOOL_COMFY_KEYS


def test_web_folder_is_registered_once(config):
    """WEB_DIRECTORY already serves web/; a [tool.comfy] web entry would register it again under
    the project name, so a pack folder named otherwise would load the extension twice."""
    assert "WEB_DIRECTORY" in (REPO / "__init__.py").read_text()
    assert config.tool_comfy.web is None


def test_reward_weights_are_listed_as_models_to_fetch(config):
    models = {Path(m.location).name: m for m in config.tool_comfy.models}
    for name in ("sac+logos+ava1-l14-linearMSE.pth", "clip-vit-large-patch14.safetensors",
                 "HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt"):
        assert name in models, f"{name} is not in [tool.comfy] Models"
    assert any(m.location.endswith("PickScore_v1/model.safetensors") for m in config.tool_comfy.models)
    for model in config.tool_comfy.models:
        folder = model.location.strip("/").split("/")[0]
        assert model.location.startswith("/") and folder in REWARD_FOLDERS, model.location
        assert model.model_url.startswith("https://"), model.model_url
    # every weight file the example workflows name is in the list, under the same file name
    from example_models import AESTHETIC_CLIP, AESTHETIC_MLP, HPS_FILE
    assert {AESTHETIC_CLIP, AESTHETIC_MLP, HPS_FILE} <= set(models)
    # and README names each: the file, or for PickScore_v1/model.safetensors its folder
    for model in config.tool_comfy.models:
        shown = Path(model.location).parts[2]
        assert f"`{shown}`" in README, shown


# --------------------------------------------------------------------------- templates

def test_every_template_has_a_thumbnail_from_its_current_workflow():
    from make_thumbnails import THUMBNAIL_SIZE, recorded_digest, workflow_digest
    from example_models import load_api

    templates = sorted(p.stem for p in TEMPLATES.glob("*.json"))
    assert templates, "no templates"
    for name in templates:
        jpg = TEMPLATES / f"{name}{THUMBNAIL_SUFFIX}"
        assert jpg.is_file(), f"{jpg.name} is missing: python3 tests/make_thumbnails.py {name}"
        image = Image.open(jpg)
        assert image.format == "JPEG" and image.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        assert recorded_digest(jpg) == workflow_digest(load_api(name)), \
            f"{jpg.name} was made from another version of the workflow: python3 tests/make_thumbnails.py {name}"
    images = sorted(p.stem for p in TEMPLATES.iterdir() if p.suffix in (".jpg", ".jpeg", ".png", ".webp"))
    assert images == templates, "a thumbnail without its template"


# --------------------------------------------------------------------------- README

def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)


def heading_positions(text: str) -> dict[str, int]:
    return {m.group(1): m.start() for m in re.finditer(r"^## (.+)$", text, flags=re.M)}


def test_quick_start_holds_the_two_commands_and_ci_runs_the_second():
    sections = heading_positions(README)
    assert list(sections)[:2] == ["Quick start", "Install"], list(sections)
    assert sections["Quick start"] < sections["Install"] < sections["Example workflows"] < sections["Nodes"]
    quick = README[sections["Quick start"]:sections["Install"]]
    commands = [line for line in fenced_blocks(quick)[0].splitlines() if line and not line.startswith("#")]
    assert commands[0] == "python3 -m pip install -r requirements-demo.txt && python3 -m demo.run_dno"
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert commands[1] in ci, f"README's test command differs from .ci/run's: {commands[1]!r} vs {ci}"
    assert len(commands) == 2


def test_the_first_screen_shows_the_pictures():
    intro = README[:heading_positions(README)["Quick start"]]
    pictures = re.findall(r'<img src="([^"]+)"', intro) + re.findall(r"!\[[^\]]*\]\(([^)]+)\)", intro)
    assert "docs/images/dno_ksampler_node.png" in pictures and "demo/examples/preference_grid.png" in pictures
    for path in pictures:
        assert (REPO / path).is_file(), path
    shot = Image.open(REPO / "docs/images/dno_ksampler_node.png")
    assert shot.format == "PNG" and shot.size[0] >= 300 and shot.size[1] >= 600, shot.size  # the tall node


@pytest.fixture(scope="module")
def display_names():
    import_comfy()
    from node_pack import load_node_pack

    pack = load_node_pack()
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    return dict(pack.NODE_DISPLAY_NAME_MAPPINGS)


NODE_ENTRY = re.compile(r"(?:^#+ |\*\*)([^*\n`]+?)(?:\*\*)? \(`(\w+)`\)", flags=re.M)


def test_readme_lists_every_node_under_its_menu_name(display_names):
    nodes_section = SHOWN[heading_positions(SHOWN)["Nodes"]:]
    listed = {cls: name for name, cls in NODE_ENTRY.findall(nodes_section)}
    wrong = {cls: (name, display_names.get(cls)) for cls, name in listed.items() if display_names.get(cls) != name}
    assert not wrong, f"README names these nodes differently from NODE_DISPLAY_NAME_MAPPINGS: {wrong}"
    missing = sorted(set(display_names) - set(listed))
    assert not missing, (f"nodes missing from README's node list (add `* **Display Name** (`Class`)`): "
                         f"{[(c, display_names[c]) for c in missing]}")


def test_every_bold_dno_name_in_readme_is_a_node(display_names):
    """Prose names a node in bold by its menu name; a stale or invented name fails here."""
    bold = set(re.findall(r"\*\*(DNO[^*]*)\*\*", SHOWN))
    unknown = bold - set(display_names.values())
    assert not unknown, f"README names nodes that do not exist: {sorted(unknown)}"


def test_compile_speed_is_not_called_unmeasured_when_it_was_measured():
    assert "TorchCompileModel" in README and "4.9 s" in README  # the measured compiled DNO step
    assert "its speed on a GPU is not measured" not in README
