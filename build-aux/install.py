"""make install / make uninstall: fdlaunch in a private library directory.

    python3 build-aux/install.py install --prefix=/usr/local [--destdir=DIR] --pip=PYTHON
    python3 build-aux/install.py uninstall --prefix=/usr/local [--destdir=DIR]

Run by the interpreter the tools will run under (the Makefile's PYTHON).
install puts the package and its dependencies (docopt-ng) in LIBDIR
(PREFIX/lib/fdlaunch) with `pip install --target` from a wheel, so nothing
lands in the system's site-packages where it could shadow a distribution
package (Debian's python3-docopt is also a top-level `docopt`). Each
console script of the built wheel becomes a small script in PREFIX/bin
that puts LIBDIR (found relative to itself) first on sys.path and calls
its main: no metadata scan at start-up, and it runs for any user who can
read PREFIX. The pip given must run the same Python version. The package alone
(not its dependencies) is also linked into the interpreter's site
directory under PREFIX, so that daemons run by that interpreter can
`import fdlaunch`. Man pages go to PREFIX/share/man, examples to
PREFIX/share/fdlaunch/examples.

Every path created outside LIBDIR is written to LIBDIR/installed-files,
without DESTDIR: uninstall removes exactly those (directories only if
empty) and LIBDIR itself. A new install first uninstalls the previous one;
a failed one removes what it made.
"""

import argparse
import compileall
import configparser
import os
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent
MANIFEST = "installed-files"

WRAPPER = """\
#!{python}
# Installed by fdlaunch's make install. The package and its dependencies
# live in {layout.libdir}, put ahead of the system's; found from this
# file's real path, so that a staged copy (DESTDIR) runs too. Every script
# is this text with its own module: fusion (fdlaunch(7)) relies on it.
import os
import sys

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), {relative!r})))
from {module} import {function}

sys.exit({function}())
"""


class Layout:
    """Where things go, as installed (paths without DESTDIR)."""

    def __init__(self, prefix, mandir=None):
        self.prefix = prefix
        self.bindir = f"{prefix}/bin"
        self.libdir = f"{prefix}/lib/fdlaunch"
        self.mandir = mandir or f"{prefix}/share/man"
        self.exampledir = f"{prefix}/share/fdlaunch/examples"
        self.sitedir = site_dir(prefix)


def site_dir(prefix):
    """This interpreter's site directory under prefix, the one it searches if there is one.

    sysconfig's schemes are no help on Debian: its posix_local scheme adds
    /local to any prefix (/usr/local/local/lib/...).
    """
    for directory in site.getsitepackages():
        if os.path.dirname(os.path.relpath(directory, prefix)).startswith("lib/python"):
            return directory
    names = {"base": prefix, "platbase": prefix, "installed_base": prefix, "installed_platbase": prefix}
    return sysconfig.get_path("purelib", "posix_prefix", vars=names)


def console_scripts(libdir):
    """{name: (module, function)} from the installed wheel's entry points (setup.cfg's console_scripts)."""
    (entry_points,) = Path(libdir).glob("fdlaunch-*.dist-info/entry_points.txt")
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str
    parser.read(entry_points)
    scripts = {}
    for name, target in parser["console_scripts"].items():
        module, _, function = (part.strip() for part in target.partition(":"))
        if not function.isidentifier():
            raise SystemExit(f"install: fatal: entry point {name} = {target!r} is not module:function")
        scripts[name] = (module, function)
    return scripts


class Installer:
    def __init__(self, layout, destdir):
        self.layout = layout
        self.destdir = destdir
        self.created = []

    def staged(self, path):
        return Path(self.destdir + path)

    def mkdirs(self, path):
        missing = []
        while path != "/" and not self.staged(path).exists():
            missing.append(path)
            path = os.path.dirname(path)
        self.staged("/").mkdir(mode=0o755, parents=True, exist_ok=True)  # DESTDIR itself is the caller's
        for directory in reversed(missing):
            self.staged(directory).mkdir(mode=0o755)
            self.created.append(directory + "/")

    def file(self, path, text=None, source=None, mode=0o644):
        self.mkdirs(os.path.dirname(path))
        target = self.staged(path)
        if target.is_symlink() or target.exists():
            target.unlink()
        if source is not None and source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            target.write_bytes(text.encode() if text is not None else source.read_bytes())
            target.chmod(mode)
        self.created.append(path)

    def link(self, path, to):
        self.mkdirs(os.path.dirname(path))
        self.staged(path).symlink_to(os.path.relpath(to, os.path.dirname(path)))
        self.created.append(path)

    def library(self, pip):
        """The wheel and its dependencies in LIBDIR, compiled for this interpreter."""
        libdir = self.layout.libdir
        asked = subprocess.run([*pip, "-c", "import sys; print(*sys.version_info[:2], sep='.')"], capture_output=True, text=True)
        ours = "{}.{}".format(*sys.version_info)
        theirs = asked.stdout.strip() or "?"
        if theirs != ours:  # pip would pick dependencies, and check python_requires, for another version
            raise SystemExit(f"install: fatal: {pip[0]!r} runs Python {theirs}, not {ours}: set VENV to a new directory")
        self.mkdirs(os.path.dirname(libdir))
        staged = self.staged(libdir)
        quiet = ["--quiet", "--disable-pip-version-check"]
        # SOURCE/build/lib, where setuptools builds, is emptied by the Makefile first (fresh-build).
        command = [*pip, "-m", "pip", "install", *quiet, "--no-compile", "--target", str(staged), str(SOURCE)]
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"install: fatal: unable to install the package and its dependencies: {shlex.join(command)} failed")
        shutil.rmtree(staged / "bin", ignore_errors=True)  # pip's scripts name the build interpreter
        for directory, subdirectories, files in os.walk(staged):
            for name in subdirectories:
                os.chmod(os.path.join(directory, name), 0o755)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o644)
        if not compileall.compile_dir(staged, ddir=libdir, quiet=1):
            raise SystemExit(f"install: fatal: unable to compile {str(staged)!r}")

    def install(self, pip):
        """Everything, or on any failure nothing: what was made so far is removed."""
        layout = self.layout
        for path in (layout.libdir, f"{layout.sitedir}/fdlaunch"):
            if self.staged(path).is_symlink() or self.staged(path).exists():
                raise SystemExit(f"install: fatal: {str(self.staged(path))!r} exists and make install did not make it: remove it first")
        try:
            self.library(pip)
            for name, (module, function) in sorted(console_scripts(self.staged(layout.libdir)).items()):
                relative = os.path.relpath(layout.libdir, layout.bindir)
                text = WRAPPER.format(python=sys.executable, layout=layout, relative=relative, module=module, function=function)
                self.file(f"{layout.bindir}/{name}", text=text, mode=0o755)
            for page in sorted((SOURCE / "man").glob("*.[17]")):
                self.file(f"{layout.mandir}/man{page.suffix[1:]}/{page.name}", source=page)
            self.link(f"{layout.sitedir}/fdlaunch", f"{layout.libdir}/fdlaunch")
            for source in sorted((SOURCE / "examples").rglob("*")):
                if "__pycache__" in source.parts or (source.is_dir() and not source.is_symlink()):
                    continue
                mode = 0o755 if os.access(source, os.X_OK) else 0o644
                self.file(f"{layout.exampledir}/{source.relative_to(SOURCE / 'examples')}", source=source, mode=mode)
            manifest = self.staged(layout.libdir) / MANIFEST
            manifest.write_text("".join(f"{path}\n" for path in self.created))
            manifest.chmod(0o644)
        except BaseException:
            remove(self.destdir, layout.libdir, self.created)
            raise


def remove(destdir, libdir, paths):
    """The files of paths and LIBDIR, then the directories of paths that are left empty, deepest first."""
    for path in paths:
        staged = Path(destdir + path)
        if not path.endswith("/") and (staged.is_symlink() or staged.exists()):
            staged.unlink()
    shutil.rmtree(destdir + libdir, ignore_errors=True)
    for path in reversed(paths):
        if path.endswith("/"):
            try:
                Path(destdir + path).rmdir()
            except OSError:  # gone, or not empty: something else lives there now
                pass


def uninstall(layout, destdir):
    """Remove what install made; False when there is nothing installed."""
    manifest = Path(destdir + layout.libdir, MANIFEST)
    if not manifest.is_file():
        return False
    remove(destdir, layout.libdir, manifest.read_text().splitlines())
    return True


def main():
    parser = argparse.ArgumentParser(prog="install.py")
    parser.add_argument("action", choices=["install", "uninstall"])
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--mandir")
    parser.add_argument("--destdir", default="")
    parser.add_argument("--pip", default=sys.executable, help="an interpreter that has pip (a venv's)")
    args = parser.parse_args()
    for name, path in (("PREFIX", args.prefix), ("MANDIR", args.mandir or "/")):
        if not path.startswith("/"):
            parser.error(f"{name} must be an absolute path, not {path!r}")
    os.umask(0o022)
    layout = Layout(os.path.normpath(args.prefix), args.mandir and os.path.normpath(args.mandir))
    destdir = args.destdir.rstrip("/")
    if args.action == "install":
        uninstall(layout, destdir)
        Installer(layout, destdir).install([args.pip])
        print(f"installed: {destdir}{layout.bindir}/fdlaunch-*, the package in {destdir}{layout.libdir}")
    elif not uninstall(layout, destdir):
        print(f"uninstall: nothing installed in {destdir}{layout.libdir}")


if __name__ == "__main__":
    main()
