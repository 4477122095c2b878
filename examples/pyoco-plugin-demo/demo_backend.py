"""A minimal PEP 517 build backend for this demo: builds a wheel from the
package folder and the [project] table of pyproject.toml, with nothing but
the standard library, so the demo installs without a network."""
import base64
import hashlib
import io
import os
import tarfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "pyoco_plugin_demo"


def _project():
    """name, version, description, requires-python and entry points of pyproject.toml.

    Reads only the simple `key = "value"` lines this file uses (tomllib is
    3.11+), enough for [project] and [project.entry-points."group"].
    """
    project, entry_points, table = {}, {}, None
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                table = line.strip("[]")
                continue
            key, _, value = (part.strip() for part in line.partition("="))
            value = value.strip('"')
            if table == "project":
                project[key] = value
            elif table and table.startswith("project.entry-points."):
                group = table[len("project.entry-points."):].strip('"')
                entry_points.setdefault(group, {})[key] = value
    return project, entry_points


def _dist_info_files():
    project, entry_points = _project()
    metadata = ("Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: %s\n"
                "Requires-Python: %s\n" % (project["name"], project["version"],
                                           project.get("description", ""),
                                           project.get("requires-python", "")))
    wheel = "Wheel-Version: 1.0\nGenerator: demo_backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    eps = "".join("[%s]\n%s\n" % (group, "".join("%s = %s\n" % kv for kv in items.items()))
                  for group, items in entry_points.items())
    return project, {"METADATA": metadata, "WHEEL": wheel, "entry_points.txt": eps}


def _basename(project):
    return "%s-%s" % (project["name"].replace("-", "_"), project["version"])


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    project, dist_info = _dist_info_files()
    base = _basename(project)
    files = {}
    for root, _, names in os.walk(os.path.join(HERE, PACKAGE)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, HERE).replace(os.sep, "/")] = f.read()
    for name, text in dist_info.items():
        files["%s.dist-info/%s" % (base, name)] = text.encode("utf-8")
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (name, digest, len(data)))
    record.append("%s.dist-info/RECORD,," % base)
    files["%s.dist-info/RECORD" % base] = ("\n".join(record) + "\n").encode("utf-8")
    filename = "%s-py3-none-any.whl" % base
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w",
                         zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return filename


def build_sdist(sdist_directory, config_settings=None):
    project, _ = _project()
    base = _basename(project)
    filename = base + ".tar.gz"
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz") as tar:
        for name in ("pyproject.toml", "demo_backend.py", "README.md", PACKAGE):
            path = os.path.join(HERE, name)
            if os.path.exists(path):
                tar.add(path, arcname="%s/%s" % (base, name),
                        filter=lambda info: None if "__pycache__" in info.name else info)
        info = tarfile.TarInfo("%s/PKG-INFO" % base)
        data = _dist_info_files()[1]["METADATA"].encode("utf-8")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return filename
