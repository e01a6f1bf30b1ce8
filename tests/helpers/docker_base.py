"""The base image the tests build on, made here without any registry: `debootstrap --variant=minbase` of Debian
then `docker import`.

Builds reach Debian's mirror and PyPI through this host's network, which may intercept HTTPS with a certificate of
its own and may configure pip: whatever the host has is copied in, generically. The CA bundles the host names (pip's
`cert`, SSL_CERT_FILE and the like) are copied to the same paths and those variables set in the image, and so are
the host's own CAs (Debian's /usr/local/share/ca-certificates). pip's configuration (`pip config list`: its files
and PIP_* variables) becomes the image's /etc/pip.conf, less what points at this host's own folders (a local index,
a folder of wheels); a file it names, such as a constraints file, is copied along. apt's proxy, if any, too. The
image is tagged with a digest of all that: a change on the host makes a new base, an unchanged host reuses the one
in the engine's cache.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers.docker_engine import Engine, Unavailable

SUITE = "bookworm"  # Debian 12: Python 3.11, PostgreSQL 15
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REPOSITORY = "cnn-pipeline-base"
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # Debian's place for a host's own CAs: kept in the bundle when a
# build installs ca-certificates (its update-ca-certificates writes the bundle again, from these and Mozilla's)


def apt_mirror() -> str:
    """The Debian mirror the host's apt uses for SUITE (one-line or deb822 sources), else Debian's own."""
    entries: list[tuple[list[str], list[str]]] = []  # (URIs, suites)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()  # drop [options]
            if len(words) >= 3 and words[0] == "deb":
                entries.append(([words[1]], [words[2]]))
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.MULTILINE))
            if "deb" in fields.get("Types", "").split():
                entries.append((fields.get("URIs", "").split(), fields.get("Suites", "").split()))
    for uris, suites in entries:
        if SUITE in suites and uris:
            return uris[0]
    return DEFAULT_MIRROR


def _keep(token: str, files: set[str]) -> bool:
    """Whether a pip setting's word works inside a build: a URL on the network, a plain value, or a file (copied
    along); not this host's folders or file:// indexes."""
    if token.startswith("file:"):
        return False
    if token.startswith("/"):
        if os.path.isfile(token):
            files.add(token)
            return True
        return False
    return True


def pip_config(files: set[str]) -> str:
    """The host's effective pip configuration as one pip.conf, less host-local paths; files it names go to `files`."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    sections: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        section = "global" if section in {"", ":env:"} else section
        words = [w for w in str(ast.literal_eval(value)).split() if _keep(w, files)]
        if words:
            sections.setdefault(section, {})[key] = " ".join(words)
    return "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in sorted(keys.items())) + "\n"
        for section, keys in sorted(sections.items())
    )


def apt_proxy() -> str:
    """The host's apt proxy settings, as apt.conf lines (empty when there is none)."""
    if shutil.which("apt-config") is None:
        return ""
    dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=False).stdout
    return "".join(f"{line}\n" for line in dump.splitlines() if re.match(r"Acquire::https?::Proxy", line))


def host_settings() -> tuple[dict[str, str], dict[str, str]]:
    """(files to place in the base: path → content, environment variables to set in it)."""
    files: set[str] = {CA_BUNDLE} if os.path.isfile(CA_BUNDLE) else set()
    files |= {str(path) for path in LOCAL_CAS.rglob("*.crt") if path.is_file()} if LOCAL_CAS.is_dir() else set()
    variables = {}
    for name in CA_VARIABLES:
        value = os.environ.get(name, "")
        if os.path.isfile(value):
            files.add(value)
            variables[name] = value
    if CA_BUNDLE in files:  # Python's ssl and requests read these: point both at the bundle when the host did not
        variables.setdefault("SSL_CERT_FILE", CA_BUNDLE)
        variables.setdefault("REQUESTS_CA_BUNDLE", CA_BUNDLE)
    contents = {"/etc/pip.conf": pip_config(files)}
    if proxy := apt_proxy():
        contents["/etc/apt/apt.conf.d/01proxy"] = proxy
    for path in sorted(files):
        contents[path] = Path(path).read_text()
    return contents, variables


def base_image(engine: Engine, cache: Path) -> str:
    """The base image's tag, made (about a minute) unless the engine already holds it for this host's settings."""
    mirror = apt_mirror()
    contents, variables = host_settings()
    digest = hashlib.sha256(repr((SUITE, mirror, sorted(contents.items()), sorted(variables.items()))).encode())
    tag = f"{REPOSITORY}:{SUITE}-{digest.hexdigest()[:12]}"
    if engine.docker("image", "inspect", tag, check=False).returncode == 0:
        return tag
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    try:
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, str(root), mirror], capture_output=True, text=True, timeout=900
        )
        if done.returncode != 0:
            raise Unavailable(f"debootstrap {SUITE} from {mirror} failed: {done.stdout[-1500:]}{done.stderr[-500:]}")
        for path, text in contents.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        for package in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):  # debootstrap's downloads
            package.unlink()
        changes = [f"--change=ENV {name}={value}" for name, value in sorted(variables.items())]
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as archive:
            imported = subprocess.run(
                ["docker", "import", *changes, "-", tag],
                stdin=archive.stdout,
                env=engine.env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
        if imported.returncode != 0:
            raise AssertionError(f"docker import failed: {imported.stderr}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    listed = engine.docker("image", "ls", "--format={{.Repository}}:{{.Tag}}", REPOSITORY).stdout.split()
    for stale in set(listed) - {tag}:  # bases of the host's former settings (images built on them keep theirs)
        engine.docker("image", "rm", stale, check=False)
    return tag
