"""The rater page in real headless Chromium (Debian's ``chromium`` and ``chromedriver``,
installed by ``make test``): ten judgements by mouse and ten by keyboard, and the
database holds exactly them. Set ``CREATIVE_SPARSE_SCREENSHOTS=<dir>`` to keep the
screenshots of the rater and admin pages (``docs/human/`` holds the committed ones)."""

import os
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="needs the 'human' extra")
pytest.importorskip("selenium", reason="needs selenium (the dev extra)")

from human_helpers import CHROMEDRIVER, CHROMIUM, REAL_RESULTS, chromium, served  # noqa: E402

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium and chromium-driver; "
                "`make browser` installs them)", allow_module_level=True)

from selenium.common.exceptions import (NoSuchElementException,  # noqa: E402
                                        StaleElementReferenceException, WebDriverException)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from creative_sparse.human.store import open_store  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    store = open_store(tmp / "h.sqlite")
    store.load_results(REAL_RESULTS)
    with served(store) as base:
        driver = chromium(tmp)
        try:
            driver.set_page_load_timeout(30)
            yield store, base, driver, tmp
        finally:   # before the server closes: it waits for open connections
            driver.quit()


# Both values read in one script on whichever document is current: element handles
# taken from the old page can die between two calls while the next page loads.
_STATE_JS = ("const p = document.getElementById('progress'), "
             "a = document.querySelector('[name=assignment]'); "
             "return p && a ? [p.dataset.done, a.value] : null;")


def _state(driver):
    values = driver.execute_script(_STATE_JS)
    if values is None:
        raise NoSuchElementException("the rater page is not loaded (yet)")
    return int(values[0]), int(values[1])


def _after_vote(driver, done):
    # While the next page loads, the old document's nodes vanish: Chromium reports that
    # as stale elements or as a generic inspector error, so the wait retries through both.
    WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,
                                                  NoSuchElementException,
                                                  WebDriverException)).until(
        lambda d: _state(d)[0] == done + 1)


def _stored(store, name):
    return [(j["answer"], j["left_rating"], j["right_rating"]) for j in store.judgements()
            if j["rater"] == name]


def _pairs(store, name):
    with store.engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            "SELECT assignment_id FROM judgements JOIN raters ON raters.id = rater_id "
            "WHERE raters.name = ? ORDER BY judgements.id", (name,))]


ANSWERS = ["left", "right", "tie", "both_bad", "left", "right", "left", "tie", "right", "left"]


def test_ten_judgements_with_the_mouse(setup):
    store, base, driver, tmp = setup
    token = store.add_rater("mouse")
    driver.get(f"{base}/r/{token}")
    shots = os.environ.get("CREATIVE_SPARSE_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(shots) / "rater.png"))
    expected, pairs = [], []
    for k, answer in enumerate(ANSWERS):
        done, pair = _state(driver)
        assert done == k
        left = 1 + k % 5 if k % 3 else None        # some votes rate, some do not
        right = 5 - k % 5 if k % 2 else None
        if left:
            driver.find_element(By.ID, f"left-rating-{left}").click()
        if right:
            driver.find_element(By.ID, f"right-rating-{right}").click()
        driver.find_element(By.ID, f"answer-{answer}").click()
        _after_vote(driver, done)
        expected.append((answer, left, right))
        pairs.append(pair)
    assert _stored(store, "mouse") == expected
    assert _pairs(store, "mouse") == pairs
    assert driver.find_element(By.ID, "progress").text.startswith("10 of 225")


def test_ten_judgements_with_the_keyboard(setup):
    store, base, driver, tmp = setup
    token = store.add_rater("keys")
    driver.get(f"{base}/r/{token}")
    keys = {"left": ["a", Keys.ARROW_LEFT], "right": ["d", Keys.ARROW_RIGHT],
            "tie": ["s", Keys.ARROW_DOWN], "both_bad": ["x", "X"]}
    expected, pairs = [], []
    for k, answer in enumerate(ANSWERS):
        done, pair = _state(driver)
        left = 1 + k % 5 if k % 3 else None
        right = 1 + (k + 2) % 5 if k % 2 else None
        actions = ActionChains(driver)
        if left:
            actions.send_keys(str(left))
        if right:
            if k % 4 == 1:   # Shift + 1-5 ...
                actions.key_down(Keys.SHIFT).send_keys(str(right)).key_up(Keys.SHIFT)
            else:            # ... or 6-0
                actions.send_keys(str((right + 5) % 10))
        actions.send_keys(keys[answer][k % 2]).perform()
        _after_vote(driver, done)
        expected.append((answer, left, right))
        pairs.append(pair)
    assert _stored(store, "keys") == expected
    assert _pairs(store, "keys") == pairs
    assert store.counts()["per_rater"]["keys"] == 10


def test_admin_page_shows_counts_and_standings(setup):
    store, base, driver, tmp = setup
    admin = store.new_admin_token()
    driver.get(f"{base}/admin/{admin}")
    assert "vote(s) recorded" in driver.find_element(By.ID, "totals").text
    rows = driver.find_elements(By.CSS_SELECTOR, "#standings tbody tr")
    assert len(rows) >= 2 and "no votes" not in rows[0].text
    shots = os.environ.get("CREATIVE_SPARSE_SCREENSHOTS")
    if shots:
        driver.set_window_size(1280, 1400)
        driver.save_screenshot(str(Path(shots) / "admin.png"))
    driver.get(f"{base}/admin/wrong")
    assert "403" in driver.title
