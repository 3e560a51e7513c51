import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, especially on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: The modules whose once-per-process warnings are said again in each test: their module-level ``*_warned``
#: containers (sets, weak sets and maps).
_SAID_ONCE_MODULES = ("lightning_act.callbacks.probe", "lightning_act.tasks.sampler_padding", "lightning_act._triton")


def forget_said_once() -> None:
    """lightning_act's and Dynamo's once-per-process warnings unsaid. A module not imported yet has said nothing."""
    for name in _SAID_ONCE_MODULES:
        module = sys.modules.get(name)
        for attribute, said in vars(module).items() if module is not None else ():
            if attribute.endswith("_warned") and callable(getattr(said, "clear", None)):
                said.clear()
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    if dynamo_utils is not None:
        dynamo_utils.warn_once_cache.clear()  # Dynamo's warn_once (its lru_cache warning among them)


@pytest.fixture(autouse=True)
def _said_once_forgotten() -> None:
    """Each test starts with the once-per-process warnings unsaid: a test asserting a warning (or its absence) passed
    or failed by which tests had said it before in the process."""
    forget_said_once()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ddp_scenario(name): the test reads scenario NAME of ddp_scenarios.py (fixture ddp_scenario)"
    )


class Scenario:
    """A scenario's directory after its launch, and the launch's stderr, shown when a file it should have written is
    missing or a rank did not return from it (a scenario that crashed, or any scenario before it in the launch)."""

    def __init__(self, directory: Path, stderr: str, ends_its_processes: bool) -> None:
        self.directory, self.stderr, self.ends_its_processes = directory, stderr, ends_its_processes

    def json(self, name: str = "out") -> dict:
        path = self.directory / name
        returned = all((self.directory / f"returned.{rank}").is_file() for rank in range(2))
        assert path.is_file() and (returned or self.ends_its_processes), self.stderr[-4000:]
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def _ddp_launches(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Scenario]:
    """Every scenario the session's tests ask for (their ``ddp_scenario`` markers), in the fewest launches of 2 CPU
    processes (ddp_scenarios.py), one after another: each launch costs 8-10 s of process start, imports and process
    group setup. A launch that does not end within its timeout is killed with both its ranks."""
    import ddp_scenarios

    names = {marker.args[0] for item in request.session.items for marker in item.iter_markers("ddp_scenario")}
    out_dir = tmp_path_factory.mktemp("ddp_scenarios")
    tests = Path(__file__).parent
    scenarios = {}
    for index, launch in enumerate(ddp_scenarios.launches(names)):
        path = os.pathsep.join([str(tests), str(tests.parent)])  # this checkout's lightning_act
        port = 29500 + (os.getpid() + 3 + index) % 1000
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MASTER_PORT=str(port))
        proc = subprocess.Popen([sys.executable, str(tests / "ddp_scenarios.py"), str(out_dir), *launch], cwd=out_dir,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # both ranks
            stderr = f"no end after 900 s\n{proc.communicate()[1]}"
        scenarios.update({name: Scenario(out_dir / name, stderr, name in ddp_scenarios.ENDERS) for name in launch})
    return scenarios


@pytest.fixture
def ddp_scenario(request: pytest.FixtureRequest, _ddp_launches: dict[str, Scenario]) -> Scenario:
    """The scenario of the test's ``ddp_scenario`` marker, run (with the session's others) before the first test that
    asks for one."""
    return _ddp_launches[request.node.get_closest_marker("ddp_scenario").args[0]]
