"""The sd-loha web UI: a Gradio app with Train, Generate, Inspect and Tools tabs.

Start it with ``sd-loha webui`` or ``python -m webui``. It binds 127.0.0.1 unless --host is given, makes
no share link unless --share, and refuses to listen beyond this machine without --auth (or an explicit
--no-auth). Every file it touches lies in the data, models and outputs folders (webui/paths.py), and
Gradio may serve files from exactly those folders.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home (also: works offline)

from .paths import PathPolicy, loopback  # noqa: E402
from .runner import TrainingRunner  # noqa: E402

logger = logging.getLogger(__name__)

CSS = """
.sdl-status {font-size: 0.95em; margin: 4px 0 8px 0;}
.sdl-bar {height: 14px; background: var(--block-background-fill, #eee); border: 1px solid var(--border-color-primary, #ccc);
          border-radius: 7px; overflow: hidden;}
.sdl-fill {height: 100%; background: #2f7de1; transition: width 0.6s;}
.sdl-fill.sdl-finished {background: #2e9e4f;} .sdl-fill.sdl-failed {background: #c0392b;}
.sdl-fill.sdl-stopped, .sdl-fill.sdl-stopping {background: #d68910;}
.sdl-line {margin-top: 4px;}
.mono textarea {font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85em;}
"""


def build_app(policy: PathPolicy | None = None, runner: TrainingRunner | None = None):
    """The gr.Blocks of the UI (not launched). One runner per app: its training job outlives browser sessions."""
    import gradio as gr

    from . import generate_tab, inspect_tab, tools_tab, train_tab

    policy = policy or PathPolicy()
    runner = runner or TrainingRunner()
    blocks_kw: dict[str, Any] = {"title": "sd-loha", "analytics_enabled": False}
    if "css" not in inspect.signature(gr.Blocks.launch).parameters:  # gradio 5: css and theme belong to Blocks
        blocks_kw["css"] = CSS
        blocks_kw["theme"] = _theme()
    with gr.Blocks(**blocks_kw) as demo:
        gr.Markdown("## sd-loha: train and use LoHA adapters\n" + f"<small>Folders this UI may use: {policy.describe()}</small>")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(policy, runner)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as gen_tab:
                gen = generate_tab.build(policy)
            with gr.Tab("Inspect", id="inspect", elem_id="tab-inspect") as insp_tab:
                insp = inspect_tab.build(policy)
            with gr.Tab("Tools", id="tools", elem_id="tab-tools") as tools_page:
                tools = tools_tab.build(policy)
        for page, refreshed in ((gen_tab, gen), (tools_page, tools)):  # newly trained or merged files show up
            refresh_fn, refresh_outputs = refreshed["refresh"]
            page.select(refresh_fn, None, refresh_outputs, api_name=False)
        insp_tab.select(lambda: gr.update(choices=generate_tab._choices(policy)), None, insp["file"], api_name=False)
        first_file, *_rest, first_lbw = gen["slots"][0]
        insp["lbw_use"].click(lambda f, w: (f, w, gr.Tabs(selected="generate")), [insp["file"], insp["lbw"]],
                              [first_file, first_lbw, tabs], api_name=False)
        poll, seen, outputs = train["poll"]
        demo.load(poll, seen, outputs, api_name=False)  # a browser that (re)connects sees the running job at once
        restore, restore_outputs = train["restore"]
        demo.load(restore, None, restore_outputs, api_name=False)
    demo.sdl_policy = policy
    demo.sdl_runner = runner
    demo.sdl_generator = gen["generator"]
    return demo


def _theme():
    """The default look with system fonts: the page then loads nothing from outside this server (offline use)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def launch(demo, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: tuple[str, str] | None = None, no_auth: bool = False, prevent_thread_lock: bool = False,
           quiet: bool = False, open_browser: bool = False):
    """Launch with the safety rules: loopback unless told, auth required off this machine, file serving
    limited to the policy's folders."""
    import gradio as gr

    exposed = share or not loopback(host)
    if exposed and auth is None and not no_auth:
        where = "a public share link" if share else f"host {host}"
        raise SystemExit(f"refusing to serve on {where} without a login: add --auth USER:PASSWORD (or --no-auth if "
                         "this network is trusted). The UI can read and write the data, models and outputs folders.")
    policy: PathPolicy = demo.sdl_policy
    kw: dict[str, Any] = dict(server_name=host, server_port=port, share=share, auth=auth,
                              allowed_paths=policy.allowed_paths(), prevent_thread_lock=prevent_thread_lock,
                              quiet=quiet, inbrowser=open_browser, show_error=True)
    params = inspect.signature(gr.Blocks.launch).parameters
    if "css" in params:
        kw["css"] = CSS
        kw["theme"] = _theme()
    if "ssr_mode" in params:
        kw["ssr_mode"] = False  # no Node server process
    if "mcp_server" in params:
        kw["mcp_server"] = False
    demo.queue(default_concurrency_limit=1)
    return demo.launch(**kw)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--data-dir", default="data", help="training image folders live here (default ./data)")
    p.add_argument("--models-dir", default="models", help="base models and adapters to load (default ./models)")
    p.add_argument("--outputs-dir", default="output", help="training runs and generated images (default ./output)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (needs --auth)")
    p.add_argument("--auth", metavar="USER:PASSWORD", default=os.environ.get("SD_LOHA_WEBUI_AUTH"),
                   help="require this login (or set SD_LOHA_WEBUI_AUTH); required with --share or a non-local --host")
    p.add_argument("--no-auth", action="store_true", help="allow a non-local --host without a login (trusted networks)")
    p.add_argument("--inbrowser", action="store_true", help="open the UI in the default browser")
    return p


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth must be USER:PASSWORD")
    return user, password


def run(args: argparse.Namespace) -> int:
    """`sd-loha webui` / `python -m webui`: build and serve until Ctrl-C."""
    auth = parse_auth(args.auth)
    if (args.share or not loopback(args.host)) and auth is None and not args.no_auth:
        launch_check = "a public share link" if args.share else f"host {args.host}"
        print(f"error: refusing to serve on {launch_check} without a login: add --auth USER:PASSWORD "
              "(or --no-auth if this network is trusted)", file=sys.stderr)
        return 2
    policy = PathPolicy(args.data_dir, args.models_dir, args.outputs_dir)
    demo = build_app(policy)
    print("sd-loha web UI; folders: " + ", ".join(f"{r.label}={r.path}" for r in policy.roots), flush=True)
    launch(demo, host=args.host, port=args.port, share=args.share, auth=auth, no_auth=args.no_auth,
           open_browser=getattr(args, "inbrowser", False), prevent_thread_lock=True, quiet=True)
    print(f"open {demo.local_url}" + (f"  (public link: {demo.share_url})" if getattr(demo, "share_url", None) else "")
          + "   (Ctrl-C to quit)", flush=True)
    try:
        demo.block_thread()  # returns on Ctrl-C
    except KeyboardInterrupt:
        pass
    runner: TrainingRunner = demo.sdl_runner
    if runner.active:  # like `sd-loha train`: Ctrl-C saves the adapter and a resumable state
        print("stopping the training run after its current step (saving the adapter and a resumable state; "
              "Ctrl-C again to abort)…", flush=True)
        runner.stop()
        try:
            runner.wait()  # the trainer prints what it saved
        except KeyboardInterrupt:
            return 130
    demo.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m webui", description="The sd-loha web UI."))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
