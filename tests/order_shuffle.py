"""``--shuffle[=SEED]``: run the collected tests in a random, reproducible order (finds order dependencies).

A pytest plugin without dependencies, registered with ``-p tests.order_shuffle`` in pyproject's ``addopts``.
Without ``--shuffle`` it changes nothing. With it, the collection tree is shuffled level by level: the
directories/packages, the modules within each, the classes within each module and the tests within each
class or module. Tests of one module (or class) stay together, so a module- or class-scoped fixture is still
set up once, and a test that only passes after another one of its module is still found.

The seed is printed after collection and again in the summary; ``--shuffle=SEED`` repeats an order. Write the
seed with ``=``: ``--shuffle`` followed by a separate word takes that word as the seed, so a path after a bare
``--shuffle`` is refused (put ``--shuffle`` after the paths, or before another option).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

SEED = pytest.StashKey[int]()


def _seed(value: str) -> int:
    """The ``--shuffle`` argument: an integer seed, or the marker for "pick one"."""
    if value == "random":
        return random.SystemRandom().randrange(2**32)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--shuffle takes an integer seed, not {value!r}: write --shuffle=SEED, or put a bare "
                         "--shuffle after the test paths") from None


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--shuffle[=SEED]``."""
    parser.getgroup("order_shuffle", "test order").addoption(
        "--shuffle", dest="shuffle_seed", nargs="?", const="random", default=None, metavar="SEED",
        help="run tests in a random order: packages, modules, classes and the tests within each are shuffled "
             "(tests of one module stay together); SEED repeats an order, a new one is printed otherwise")


def pytest_configure(config: pytest.Config) -> None:
    """Fix the seed once per session (an error for a seed that is not an integer)."""
    value = config.getoption("shuffle_seed")
    if value is not None:
        try:
            config.stash[SEED] = _seed(str(value))
        except ValueError as error:
            raise pytest.UsageError(str(error)) from None


def pytest_report_collectionfinish(config: pytest.Config) -> str | None:
    """The seed, before the first test runs (printed even with -q, unlike the header: a hung run still shows it)."""
    return f"order shuffled: --shuffle={config.stash[SEED]}" if SEED in config.stash else None


def _shuffled(items: list[pytest.Item], depth: int, rng: random.Random) -> list[pytest.Item]:
    """``items`` grouped by their collection node at ``depth`` (order of first appearance), groups shuffled,
    then each group the same way one level down; a level without parents left is shuffled item by item."""
    groups: dict[Any, list[pytest.Item]] = {}
    for index, item in enumerate(items):
        chain = item.listchain()  # session, dirs/packages, module, class, ..., the item itself
        key = chain[depth].nodeid if depth < len(chain) - 1 else ("item", index)  # unique even for duplicates
        groups.setdefault(key, []).append(item)
    order = list(groups.values())
    rng.shuffle(order)
    result: list[pytest.Item] = []
    for group in order:
        result.extend(group if len(group) == 1 else _shuffled(group, depth + 1, rng))
    return result


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Shuffle after the other plugins have selected and ordered (so the seed alone decides the order)."""
    if SEED in config.stash and items:
        items[:] = _shuffled(list(items), 1, random.Random(config.stash[SEED]))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The seed again at the end, where a failure is read."""
    if SEED in config.stash:
        terminalreporter.write_line(f"order shuffled with --shuffle={config.stash[SEED]} (pass it to repeat)")
