"""masktrain.gc_tuning: no collections during start-up, start-up objects frozen once, garbage
still collected (with its finalizers) after the freeze and at exit, and an opt-out."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from masktrain import gc_tuning


def _run(code: str, **env_extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != gc_tuning.ENV}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


LIFECYCLE = """
    import gc
    from masktrain import gc_tuning as t
    print(t.defer_collections(), gc.isenabled())
    startup = [[] for _ in range(1000)]          # long-lived start-up objects
    print(t.freeze_startup_objects(), gc.isenabled(), gc.get_freeze_count() >= 1000)
    frozen = gc.get_freeze_count()
    print(t.freeze_startup_objects(), t.defer_collections(), gc.get_freeze_count() == frozen)

    class Cycle:
        def __del__(self):
            print("finalized")
    a = Cycle(); a.me = a
    del a
    print(gc.collect() > 0)                      # garbage made after the freeze is collected
"""


def test_lifecycle():
    assert _run(LIFECYCLE) == ["True", "False", "True", "True", "True", "False", "False", "True", "finalized", "True"]


def test_opt_out_leaves_the_collector_alone():
    out = _run("""
        import gc
        from masktrain import gc_tuning as t
        print(t.defer_collections(), gc.isenabled(), t.freeze_startup_objects(), gc.get_freeze_count(),
              t.collect_once_at_exit())
    """, MASKTRAIN_GC_TUNING="0")
    assert out == ["False", "True", "False", "0", "False"]


def test_exit_hook_runs_the_finalizers_of_garbage_cycles():
    """A cycle dropped before exit is collected (its ``__del__`` runs) by the exit handler; the
    handler is registered once however often it is asked for."""
    out = _run("""
        from masktrain import gc_tuning as t
        print(t.collect_once_at_exit(), t.collect_once_at_exit())

        class Cycle:
            def __del__(self):
                print("finalized", flush=True)
        a = Cycle(); a.me = a
        del a
        import gc
        gc.disable()                             # only the exit handler can collect it now
    """)
    assert out == ["True", "False", "finalized"]
