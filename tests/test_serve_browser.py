"""The web chat page in a real headless Chromium (Selenium + the system chromedriver): a streamed answer, stop,
thumbs up, a compare-mode ranking, the rows in the database, and an export the reward stage accepts."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from serve_helpers import MODEL, tiny_engine

from chatforge.cli import main
from chatforge.data.rankings import read_rankings
from chatforge.infer.scheduler import Scheduler
from chatforge.serve.api import ServeOptions, create_app
from chatforge.serve.feedback import FeedbackStore, Message, Ranking
from chatforge.serve.security import CLIENT_COOKIE, browser_id
from chatforge.serve.server import BackgroundServer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (scripts/setup.sh installs it)")
By = pytest.importorskip("selenium.webdriver.common.by").By
WebDriverException = pytest.importorskip("selenium.common.exceptions").WebDriverException

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                       "(scripts/setup.sh installs them when apt-get is available)"),
]


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except WebDriverException:  # the page re-rendered under us: look again
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def page(tmp_path):
    engine = tiny_engine(block_size=128)
    # ~30 ms a decode step: answers stream for long enough to be watched growing, and to be stopped
    hook = engine.model.register_forward_hook(lambda *_: time.sleep(0.03))
    store = FeedbackStore(tmp_path / "run" / "feedback.db")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager try to download a driver
    with Scheduler(engine) as scheduler, BackgroundServer(create_app(scheduler, ServeOptions(model_name=MODEL),
                                                                     store=store)) as server:
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
        try:
            driver.get(server.url + "/")
            wait_for(lambda: MODEL in driver.find_element(By.ID, "model-name").text, what="the page to load")
            yield driver, store, tmp_path
        finally:
            driver.quit()
            hook.remove()
            store.close()


def _set(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _send(driver, text: str) -> None:
    _set(driver, "input", text)
    driver.find_element(By.ID, "send").click()


def test_chat_stream_stop_rate_and_rank_end_in_an_export(page):
    driver, store, tmp_path = page
    _set(driver, "temperature", "0")
    _set(driver, "max-tokens", "20")
    _send(driver, "Hello world")
    pending = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".pending .body"), what="the answer to start")[0]
    seen = set()
    while driver.find_elements(By.CSS_SELECTOR, ".pending"):  # watch it grow until the page stores it
        try:
            seen.add(pending.text)
        except WebDriverException:  # the element was replaced by the stored answer between the check and the read
            break
        time.sleep(0.01)
    assert len({t for t in seen if t}) >= 3, f"answer did not stream: saw {seen}"
    answer = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.role-assistant:not(.pending)"),
                      what="the stored answer")[0]
    final = answer.find_element(By.CSS_SELECTOR, ".body").text
    assert final and all(final.startswith(t) for t in seen if t)
    answer.find_element(By.CSS_SELECTOR, ".thumbs-up").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".thumbs-up.active"), what="the thumbs up")

    _set(driver, "max-tokens", "100")  # stop a long answer midway
    _send(driver, "The quick brown fox")
    wait_for(lambda: any(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".pending .body")), what="text")
    driver.find_element(By.ID, "stop").click()
    wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, ".pending"), what="the stopped answer to be stored")

    driver.find_element(By.ID, "compare-toggle").click()
    _set(driver, "temperature", "1")
    _set(driver, "max-tokens", "8")
    _send(driver, "Which answer is best?")
    buttons = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".compare-col .rank-btn"), what="4 answers")
    assert len(buttons) == 4 and driver.find_element(By.ID, "send").get_property("disabled")  # rank first
    order = [2, 0, 3, 1]
    for i in order:
        buttons[i].click()
    driver.find_element(By.ID, "submit-ranking").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".compare-col.best"), what="the ranking to be saved")
    assert not driver.find_element(By.ID, "send").get_property("disabled")

    with store.session() as s:
        messages = s.query(Message).all()
        (ranking,) = s.query(Ranking).all()
        assert ranking.ranking == order and ranking.model_id == MODEL
        answers = [m for m in messages if m.role == "assistant"]
        assert len(answers) == 6 and {m.model_id for m in answers} == {MODEL}
        assert [m.finish_reason for m in answers[:2]] == ["length", "cancelled"]  # the server's record
        assert answers[0].content == final and answers[0].ratings[-1].value == 1
        assert sorted(m.compare_index for m in answers[2:]) == [0, 1, 2, 3]
        assert len({m.compare_group for m in answers[2:]}) == 1
        assert {x.kind for x in answers[0].signals} == {"continued"}

    out = tmp_path / "rankings.jsonl"
    main(["feedback", "export", "--as=rankings", f"--run_dir={tmp_path / 'run'}", f"--out={out}"])
    (record,) = read_rankings(out)
    assert [m["content"] for m in record["prompt"]][-1] == "Which answer is best?"
    assert record["ranking"] == [[2], [0], [3], [1]]
    reward = pytest.importorskip("chatforge.train.reward")
    engine = tiny_engine(block_size=128)
    assert len(reward.load_rankings(out, engine.tokenizer, engine.block_size)) == 1


def test_regenerate_copy_edit_and_resubmit_are_recorded(page):
    driver, store, _ = page
    _set(driver, "max-tokens", "6")

    def settled():
        time.sleep(0.2)
        wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, ".pending") and
                 not driver.find_element(By.ID, "send").get_property("disabled"), what="the answer to be stored")

    _send(driver, "Hello world")
    settled()
    driver.find_element(By.CSS_SELECTOR, ".regenerate").click()
    settled()
    assert driver.find_element(By.CSS_SELECTOR, ".msg.role-assistant .nav").text.strip() == "‹ 2/2 ›"
    driver.find_element(By.CSS_SELECTOR, ".msg.role-assistant .copy").click()
    wait_for(lambda: driver.find_element(By.ID, "status").text == "copied", what="the copy")
    driver.find_element(By.CSS_SELECTOR, ".msg.role-assistant .edit").click()
    area = driver.find_element(By.CSS_SELECTOR, ".msg.role-assistant textarea")
    area.clear()
    area.send_keys("A fixed answer.")
    driver.find_element(By.CSS_SELECTOR, ".save-edit").click()
    wait_for(lambda: "A fixed answer." in driver.find_element(By.CSS_SELECTOR, ".msg.role-assistant .body").text,
             what="the edited answer")
    _send(driver, "Second question")
    settled()
    driver.find_elements(By.CSS_SELECTOR, ".msg.role-user .edit")[-1].click()
    area = driver.find_element(By.CSS_SELECTOR, ".msg.role-user textarea")
    area.clear()
    area.send_keys("Second question, rephrased")
    driver.find_element(By.CSS_SELECTOR, ".save-edit").click()
    settled()

    browser = browser_id(driver.get_cookie(CLIENT_COOKIE)["value"])  # without keys, conversations are per browser
    (conversation,) = store.list_conversations(browser)
    assert store.list_conversations() == []
    messages = store.get_conversation(conversation["id"], browser)["messages"]
    shown = [(m["role"], m["signals"], m["edited"]) for m in messages]
    assert shown == [("user", [], False), ("assistant", ["regenerated"], False),
                     ("assistant", ["continued", "copied"], True), ("user", [], False),
                     ("assistant", ["asked_again"], False), ("user", [], False), ("assistant", [], False)]
    assert messages[5]["content"] == "Second question, rephrased" and messages[5]["parent_id"] == messages[2]["id"]
    (demo,) = store.sft_records()  # the person's fixed answer is a demonstration
    assert demo["messages"] == [{"role": "user", "content": "Hello world"},
                                {"role": "assistant", "content": "A fixed answer."}]
    assert demo["provenance"] == "human-edited"
