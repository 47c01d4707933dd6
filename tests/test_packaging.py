"""What gets installed: one top-level name, `headroom`, whatever the repository's layout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _source_copy(dest: Path) -> Path:
    """The tracked files (symlinks kept), so building leaves no build/ folder in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet committed
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        else:
            shutil.copy2(source, target)
    return dest


def test_the_wheel_installs_only_the_headroom_package(tmp_path: Path) -> None:
    source = _source_copy(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("headroom_memory-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names}
        assert tops == {"headroom", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                        + ".dist-info"}
        # The CLI is shipped as a real module (the symlink's target, not the link).
        assert archive.read("headroom/cli.py") == (ROOT / "cli.py").read_bytes()
        for module in ("headroom/memory/hierarchical.py", "headroom/proxy/app.py",
                       "headroom/memory/adapters/__init__.py", "headroom/__main__.py"):
            assert module in names
        dist_info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "headroom = headroom.cli:main" in archive.read(dist_info).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        requires = [line for line in metadata.decode().splitlines()
                    if line.startswith("Requires-Dist: torch")]
        assert requires and all(">=" in r and "==" not in r for r in requires), requires


def test_a_users_own_memory_and_proxy_modules_do_not_shadow_ours(tmp_path: Path) -> None:
    (tmp_path / "memory.py").write_text("raise SystemExit('the user module was imported')\n")
    (tmp_path / "proxy.py").write_text("raise SystemExit('the user module was imported')\n")
    (tmp_path / "cli.py").write_text("raise SystemExit('the user module was imported')\n")
    code = (
        "from headroom import with_memory\n"
        "from headroom.memory import HierarchicalMemory\n"
        "from headroom.memory.ports import MemoryFilter, VectorFilter\n"
        "import headroom.cli\n"
        "print(HierarchicalMemory.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("headroom.memory.")


def test_python_dash_m_headroom_is_the_cli(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "headroom", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "memories" in out.stdout
