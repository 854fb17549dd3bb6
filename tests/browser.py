"""Headless Chromium against a real ComfyUI server with the official frontend, for web tests.

Not a test module. ``tests/setup_browser.sh`` installs what this needs: Debian's chromium at
/usr/bin/chromium, the Playwright Python driver (its own browser downloads are never used) and
``comfyui-frontend-package``, the frontend ComfyUI 0.3.75 pins.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from comfy_host import REPO_ROOT, ComfyServer

CHROMIUM = os.environ.get("DNO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage",
]
ARTIFACTS = REPO_ROOT / "outputs" / "test-artifacts"
SETUP_HINT = "run `bash tests/setup_browser.sh` as root (installs chromium, playwright, the frontend)"

# Settings a fresh user would otherwise be asked about in dialogs on first load.
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Validation.Workflows": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
}


class BrowserSetupError(RuntimeError):
    """Chromium, Playwright or the frontend package is missing."""


def frontend_root() -> Path:
    """The ``static`` folder of the installed official frontend wheel."""
    try:
        import comfyui_frontend_package
    except ImportError:
        raise BrowserSetupError(f"comfyui-frontend-package is not installed; {SETUP_HINT}") from None
    root = Path(comfyui_frontend_package.__file__).resolve().parent / "static"
    if not (root / "index.html").is_file():
        raise BrowserSetupError(f"{root} has no index.html; reinstall it: {SETUP_HINT}")
    return root


def check_browser_setup() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        raise BrowserSetupError(f"no chromium at {CHROMIUM}; {SETUP_HINT}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise BrowserSetupError(f"the playwright Python package is missing; {SETUP_HINT}") from None
    frontend_root()


def ui_server(models: dict, **kwargs) -> ComfyServer:
    """A ComfyServer that serves the official frontend (the harness default serves none)."""
    extra = ["--front-end-root", str(frontend_root()), *kwargs.pop("extra_args", [])]
    return ComfyServer(models=models, extra_args=extra, **kwargs)


def write_user_settings(server: ComfyServer, settings: dict | None = None) -> None:
    """Settings of the default user, read by the frontend when the page loads."""
    folder = server.base_dir / "user" / "default"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comfy.settings.json").write_text(json.dumps({**QUIET_SETTINGS, **(settings or {})}))


@dataclass
class ConsoleLog:
    """Console messages and uncaught page errors of one page."""
    messages: list[dict] = field(default_factory=list)

    def attach(self, page) -> None:
        page.on("console", lambda m: self.messages.append(
            {"type": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
        page.on("pageerror", lambda e: self.messages.append(
            {"type": "pageerror", "text": f"{e.name}: {e.message}\n{e.stack or ''}", "url": ""}))

    def errors(self) -> list[dict]:
        return [m for m in self.messages if m["type"] in ("error", "pageerror")]

    def mentioning(self, needle: str, kinds=("error", "pageerror", "warning")) -> list[dict]:
        needle = needle.lower()
        return [m for m in self.messages if m["type"] in kinds
                and (needle in m["text"].lower() or needle in m["url"].lower())]

    def report(self) -> str:
        return "\n".join(f"[{m['type']}] {m['text'][:300]} ({m['url']})" for m in self.messages)


@contextlib.contextmanager
def chromium_page(viewport=(1600, 1000)) -> Iterator[tuple[Any, ConsoleLog]]:
    """A page of a fresh headless Debian chromium (new profile), with its console collected."""
    check_browser_setup()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="dno-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": viewport[0], "height": viewport[1]})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            log = ConsoleLog()
            log.attach(page)
            yield page, log
        finally:
            context.close()


def open_comfy(page, server: ComfyServer, node_types=(), timeout_ms: int = 90_000) -> None:
    """Load the ComfyUI page and wait until the app is up with ``node_types`` registered."""
    page.goto(server.url + "/", wait_until="domcontentloaded", timeout=timeout_ms)
    page.wait_for_function(
        """(types) => {
            const app = window.comfyAPI?.app?.app;
            const lg = window.LiteGraph;
            return !!(app && app.graph && app.canvas && lg
                      && types.every((t) => lg.registered_node_types[t]));
        }""", arg=list(node_types), timeout=timeout_ms)


def save_screenshot(page, name: str, **kwargs) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), **kwargs)
    return path
