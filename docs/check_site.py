"""Load the built site in headless Chromium and check what a reader sees.

    python docs/check_site.py site [OUT_DIR]

Serves SITE on 127.0.0.1, drives Chromium over the DevTools protocol on a pipe (no websocket
library, no browser-automation dependency) and checks: the home page renders its title and the
navigation; the API page has an entry for every name in ``jaxl2.__all__`` and
``jaxl2.mnist.__all__``; the command reference has a section per command; the search box finds ``add_decayed_weights``; every figure loads.
Screenshots of each go to OUT_DIR (default build/docs-check/). Exit status 0 when all pass.
"""

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import jaxl2
import jaxl2.mnist

FIGURES = {"curves.png", "lambda_momentum.png", "sweep_adam.png", "sweep_momentum.png"}
FIGURE_PAGES = ["results/", "app/train/", "guide/auto/"]


class Browser:
    """Chromium with --remote-debugging-pipe: JSON messages, NUL-terminated, on fds 3 and 4."""

    def __init__(self, exe: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-pipe",
                "--user-data-dir=" + os.path.abspath(os.path.join("build", "docs-check-profile")),
                "about:blank",
            ],
            # the protocol's fds are 3 and 4: set them in the child (close_fds would close them again)
            close_fds=False,
            preexec_fn=lambda: (os.dup2(to_chrome_r, 3), os.dup2(from_chrome_w, 4)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id = b"", 0

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        self.send("Page.navigate", {"url": url}, session)
        return session

    def eval(self, session: str, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return r.get("result", {}).get("value")

    def wait(self, session: str, expression: str, timeout: float = 30.0):
        """The value of ``expression`` once it is truthy (polled), or its last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(session, expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.2)

    def screenshot(self, session: str, path: str) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except RuntimeError:
            pass
        self.proc.wait(timeout=10)


def serve(site: str) -> tuple[http.server.ThreadingHTTPServer, list]:
    requests: list[tuple[str, int]] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            requests.append((self.path, int(code) if str(code).isdigit() else 0))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


def main(site: str, out: str) -> int:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        print("docs-check: no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    server, requests = serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    browser = Browser(exe)
    failures = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    try:
        s = browser.open(base)
        title = browser.wait(s, "document.readyState === 'complete' && document.title")
        nav = browser.wait(
            s,
            "[...document.querySelectorAll('.md-nav--primary .md-nav__link')]"
            ".map(a => a.textContent.trim()).filter(t => t)",
        )
        check(bool(title) and title.startswith("jaxl2"), f"home page title: {title!r}")
        wanted = ["Guides", "The application", "Results", "Performance", "API reference"]
        check(
            all(w in (nav or []) for w in wanted),
            f"home page navigation ({len(nav or [])} links) has {wanted}",
        )
        browser.screenshot(s, os.path.join(out, "home.png"))

        s = browser.open(base + "api/")
        ids = set(
            browser.wait(
                s,
                "document.readyState === 'complete' && [...document.querySelectorAll('[id]')].map(e => e.id)",
            )
            or []
        )
        public = [f"jaxl2.{n}" for n in jaxl2.__all__] + [f"jaxl2.mnist.{n}" for n in jaxl2.mnist.__all__]
        missing = [n for n in public if n not in ids]
        check(
            not missing,
            f"API page has an entry for all {len(public)} public names"
            + (f"; missing {missing}" if missing else ""),
        )
        browser.screenshot(s, os.path.join(out, "api.png"))

        s = browser.open(base + "app/cli/")
        heads = browser.wait(
            s,
            "document.readyState === 'complete' && "
            "[...document.querySelectorAll('.md-content h2')].map(h => h.textContent.replace('¶', '').trim())",
        )
        commands = [f"jaxl2 {c}" for c in ("train", "sweep", "eval", "bench", "gradcheck")]
        check(all(c in (heads or []) for c in commands), f"command reference has sections {heads}")
        browser.screenshot(s, os.path.join(out, "cli.png"))

        s = browser.open(base)
        browser.wait(s, "document.readyState === 'complete'")
        browser.eval(
            s,
            "(() => { const q = document.querySelector('input[data-md-component=search-query]');"
            " q.focus(); q.value = 'add_decayed_weights';"
            " q.dispatchEvent(new Event('input', {bubbles: true}));"
            " q.dispatchEvent(new KeyboardEvent('keyup', {bubbles: true})); return true; })()",
        )
        hits = browser.wait(
            s,
            "[...document.querySelectorAll('.md-search-result__item')]"
            ".map(e => e.textContent).filter(t => t.includes('add_decayed_weights')).length",
        )
        check(bool(hits), f"search for add_decayed_weights: {hits or 0} results that name it")
        browser.screenshot(s, os.path.join(out, "search.png"))

        seen = set()
        for page in FIGURE_PAGES:
            s = browser.open(base + page)
            imgs = browser.wait(
                s,
                "document.readyState === 'complete' && "
                "[...document.images].every(i => i.complete) && "
                "[...document.images].filter(i => i.src.endsWith('.png'))"
                ".map(i => [i.src.split('/').pop(), i.naturalWidth, i.naturalHeight])",
            )
            for name, w, h in imgs or []:
                check(w > 0 and h > 0, f"{page}: figure {name} loads ({w}×{h})")
                seen.add(name)
            browser.eval(s, "document.querySelector('.md-content img').scrollIntoView(); true")
            time.sleep(0.3)
            browser.screenshot(s, os.path.join(out, page.strip("/").replace("/", "-") + ".png"))
        check(seen == FIGURES, f"figures shown: {sorted(seen)}")
        bad = [(p, c) for p, c in requests if c >= 400]
        check(
            not bad,
            f"every request the pages made was served ({len(requests)} requests)"
            + (f"; failed: {bad}" if bad else ""),
        )
    finally:
        browser.close()
        server.shutdown()
    print(f"screenshots in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else os.path.join("build", "docs-check")))
