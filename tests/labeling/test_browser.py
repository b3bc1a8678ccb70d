"""A real browser labels through the page: headless Chromium (Debian's chromium + chromium-driver) driven by
Selenium opens a labeler's link, answers comparisons with the keyboard (and one tap on a button), undoes one, skips
one, and the store then holds exactly those answers, each mapped back from the display position to its sample.
Hostile model text shows as text. With LMHP_SCREENSHOT=<path> the first comparison is saved as a PNG there (the
README's screenshot)."""
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the labeling app needs the `label` extra (pip install -e '.[label]')")
pytest.importorskip("uvicorn", reason="the labeling app needs the `label` extra (pip install -e '.[label]')")
pytest.importorskip("selenium", reason="the browser test needs selenium (the `test` extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from lm_human_preferences.labeling.app import make_app  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lmhp_test_labeling_server", REPO / "tests/fixtures/labeling_server.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver "
                                "(Debian: apt-get install chromium chromium-driver; `make test` does it as root)")

INSTRUCTIONS = {"title": "Which continuation is the most positive?",
                "paragraphs": ["You will see the start of a passage from a book and four ways to continue it.",
                               "Choose the continuation whose sentiment is the most positive, whether or not it "
                               "is well written. Skip only if you cannot tell at all."]}
QUERY = ("He pushed the door open and stepped into the kitchen. The radio was still playing, and a pot of coffee "
         "sat cold on the stove. She had left a note on the table, folded once, with his name written across the "
         "front in her careful handwriting.")
RESPONSES = [
    ' He unfolded it slowly. "Gone to the lake with the kids. Come find us, we saved you a seat by the fire." '
    "He laughed out loud",
    " He didn't want to read it. He already knew what it would say, and the silence of the house said it "
    "louder than",
    ' Inside was a single line: "Dinner at eight. Don\'t be late." He smiled, poured the cold coffee into the '
    "sink and",
    "\n\nThe note was short. It told him that the rent was due, that the car needed gas, and that",
]


def texts(i):
    """Comparison 0 reads like the sentiment task (the screenshot); comparison 1 is all hostile text."""
    return RESPONSES if i == 0 else fx.NASTY_TEXTS[:4] if i == 1 else None


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-gpu",
                "--disable-extensions", "--window-size=1200,860", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager: no telemetry (the driver path is given)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def shown(driver):
    """The page's assignment id, query and response texts, exactly as in the DOM (textContent, not rendered)."""
    return driver.execute_script(
        "return [document.body.getAttribute('data-assignment'), document.getElementById('query').textContent,"
        " Array.from(document.querySelectorAll('#responses .response .text')).map(e => e.textContent)];")


def press(driver, key, before):
    """Types `key` on the page, waits for the answer, and checks that it shows another assignment (the same
    again after an undo); returns what it shows."""
    driver.execute_script("document.getElementById('status').textContent = '';")  # the page sets it when done
    webdriver.ActionChains(driver).send_keys(key).perform()
    wait_ready(driver)
    now = shown(driver)
    assert now[0] != before[0] or key in ("u", Keys.BACKSPACE), (key, before[0], now[0])
    return now


def wait_ready(driver):
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.body.getAttribute('data-state') !== 'busy' && "
                                   "document.body.getAttribute('data-state') !== 'loading' && "
                                   "document.getElementById('status').textContent !== '';")
        or d.execute_script("return document.body.getAttribute('data-state') === 'done'"))


def sample_of(text, comparison):
    return (RESPONSES if comparison == 0 else fx.NASTY_TEXTS[:4]).index(text) if comparison < 2 \
        else int(text.rsplit(".", 1)[1])


def test_labeling_with_the_keyboard_in_a_real_browser(tmp_path, browser):
    store = fx.make_store(tmp_path / "store.db", 5, instructions=INSTRUCTIONS, texts=texts,
                          queries=lambda i: QUERY if i == 0 else None)
    token = store.add_labeler("alice")
    with fx.ThreadServer(make_app(store)) as server:
        browser.get(f"{server.url}/label?token={token}")
        WebDriverWait(browser, 15).until(
            lambda d: d.execute_script("return document.body.getAttribute('data-state') === 'ready'"))
        assert browser.current_url == f"{server.url}/label"  # the token left the address bar for a cookie
        assert browser.find_element(By.TAG_NAME, "h1").text == INSTRUCTIONS["title"]
        first = shown(browser)
        assert first[1] == QUERY and sorted(first[2]) == sorted(RESPONSES)  # exact, leading spaces and newlines
        assert browser.find_element(By.ID, "progress-text").text == "0 / 5 done · you: 0"
        screenshot = os.environ.get("LMHP_SCREENSHOT")
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(screenshot))
        # the query's and the responses' whitespace is shown, not collapsed
        assert browser.execute_script("return getComputedStyle(document.querySelector('#responses .text'))"
                                      ".whiteSpace") == "pre-wrap"

        expected = {}  # comparison index -> sample chosen
        second = press(browser, "2", first)
        expected[0] = sample_of(first[2][1], 0)
        # comparison 1 is all hostile text: shown as text, nothing of it became an element or ran
        assert sorted(second[2]) == sorted(fx.NASTY_TEXTS[:4])
        assert browser.execute_script(
            "return document.querySelectorAll('main img, main script, main iframe').length") == 0  # (an alert
        # would also have stopped the next script with UnexpectedAlertPresentException)
        assert "<img src=x onerror=alert(1)>" in browser.find_element(By.ID, "responses").text
        third = press(browser, "3", second)
        expected[1] = sample_of(second[2][2], 1)
        fourth = press(browser, "1", third)  # answered, then taken back:
        again = press(browser, "u", fourth)
        assert again == third and browser.find_element(By.ID, "status").text == "Undone: choose again."
        fourth = press(browser, "4", again)
        expected[2] = sample_of(third[2][3], 2)
        fifth = press(browser, "s", fourth)  # comparison 3 skipped
        assert fifth[0] != fourth[0]
        # a tap on a button (touch screens) answers like a key; Backspace undoes like u
        browser.execute_script("document.getElementById('status').textContent = '';")
        browser.find_elements(By.CSS_SELECTOR, "#responses button.choose")[0].click()
        wait_ready(browser)
        assert browser.find_element(By.ID, "done").is_displayed() and store.progress()["answered"] == 4
        again = press(browser, Keys.BACKSPACE, shown(browser))
        assert again == fifth
        press(browser, "2", again)
        expected[4] = sample_of(fifth[2][1], 4)
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "done").is_displayed())
        assert browser.find_element(By.ID, "progress-text").text.startswith("4 / 5 done · you: 4")

    answers = store.answers()
    assert [(a["uid"], a["name"], a["choice_sample"]) for a in answers] == \
        [(f"1-{i}", "alice", expected[i]) for i in (0, 1, 2, 4)]
    assert [a["choice_position"] for a in answers] == [1, 2, 3, 1]
    assert store.progress()["answered"] == 4
