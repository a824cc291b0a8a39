//! A local conda channel for tests (no network): two small noarch packages built with
//! Python's tarfile, and the script that checks a run sees the environment activated.

use std::path::Path;

use crate::python;

/// A conda channel at `dir` with two noarch packages: `kiln-greeting` (a data file) and
/// `hello-kiln` (depends on it; installs `bin/hello-kiln`, a script whose text names the
/// install prefix through conda's placeholder, so prefix replacement is exercised).
pub fn write_channel(dir: &Path) {
    let script = r##"
import hashlib, io, json, os, sys, tarfile
channel = sys.argv[1]
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"
def package(name, depends, files):
    index = {"name": name, "version": "1.0", "build": "0", "build_number": 0,
             "depends": depends, "noarch": "generic", "subdir": "noarch",
             "license": "MIT", "timestamp": 1700000000000}
    paths = []
    for path, (text, mode) in files.items():
        data = text.encode()
        entry = {"_path": path, "path_type": "hardlink",
                 "sha256": hashlib.sha256(data).hexdigest(), "size_in_bytes": len(data)}
        if PLACEHOLDER in text:
            entry.update(file_mode="text", prefix_placeholder=PLACEHOLDER)
        paths.append(entry)
    meta = {"info/index.json": json.dumps(index),
            "info/paths.json": json.dumps({"paths": paths, "paths_version": 1}),
            "info/files": "".join(p + "\n" for p in files)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        for path, (text, mode) in list(files.items()) + [(k, (v, 0o644)) for k, v in meta.items()]:
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 1700000000
            tar.addfile(info, io.BytesIO(data))
    archive = buffer.getvalue()
    filename = f"{name}-1.0-0.tar.bz2"
    with open(os.path.join(channel, "noarch", filename), "wb") as f:
        f.write(archive)
    record = dict(index, md5=hashlib.md5(archive).hexdigest(),
                  sha256=hashlib.sha256(archive).hexdigest(), size=len(archive))
    return filename, record
os.makedirs(os.path.join(channel, "noarch"), exist_ok=True)
packages = dict([
    package("kiln-greeting", [], {"share/kiln-greeting/greeting.txt": ("hello from conda\n", 0o644)}),
    package("hello-kiln", ["kiln-greeting"], {"bin/hello-kiln": (
        "#!/bin/sh\necho \"installed in " + PLACEHOLDER + "\"\ncat " + PLACEHOLDER
        + "/share/kiln-greeting/greeting.txt\n", 0o755)}),
])
repodata = {"info": {"subdir": "noarch"}, "packages": packages, "packages.conda": {},
            "repodata_version": 1}
with open(os.path.join(channel, "noarch", "repodata.json"), "w") as f:
    json.dump(repodata, f)
"##;
    let status = std::process::Command::new(python())
        .args(["-c", script])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "building the test channel failed");
}

/// Prints what a run in the test channel's environment sees: `CONDA_PREFIX`,
/// `CONDA_DEFAULT_ENV`, where `hello-kiln` was found and what it prints.
pub const CHECK_CONDA: &str = "import os, shutil, subprocess\n\
print('CONDA_PREFIX', os.environ['CONDA_PREFIX'])\n\
print('CONDA_DEFAULT_ENV', os.environ['CONDA_DEFAULT_ENV'])\n\
print('which', shutil.which('hello-kiln'))\n\
print(subprocess.run(['hello-kiln'], capture_output=True, text=True, check=True).stdout, end='')\n";
