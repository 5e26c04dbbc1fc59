"""base.on_import: a function runs on a module right after its first import, never before."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys
    from ckptmigrate.base.on_import import when_imported

    assert "colorsys" not in sys.modules and "json" not in sys.modules
    seen = []
    with when_imported("colorsys", lambda m: seen.append(m.rgb_to_hsv)):
        assert seen == []
        import colorsys
    assert seen == [colorsys.rgb_to_hsv]  # called once the module had run
    assert colorsys.__loader__ is colorsys.__spec__.loader
    assert type(colorsys.__loader__).__name__ == "SourceFileLoader"
    assert not any(type(f).__name__ == "_FirstImport" for f in sys.meta_path)
    with when_imported("colorsys", seen.append):  # imported already: at once
        assert seen[-1] is colorsys
    with when_imported("json", seen.append):  # never imported in the block: never called
        pass
    import json
    assert seen[-1] is colorsys and not any(type(f).__name__ == "_FirstImport" for f in sys.meta_path)
    try:
        with when_imported("no_such_module_here", seen.append):
            import no_such_module_here
    except ModuleNotFoundError:
        pass
    assert seen[-1] is colorsys
    print("ok")
    """)


def test_then_runs_after_the_first_import_and_the_module_keeps_its_own_loader() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
