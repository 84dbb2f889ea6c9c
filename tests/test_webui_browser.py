"""MoFaSGD in LlamaBoard in a real browser: headless Chromium opens the accordion, sets the rank, previews.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and selenium (the dev extras); nothing
downloads a browser. The server listens on 127.0.0.1 only. Set MFSGD_WEBUI_SCREENSHOT=docs/webui_mfsgd.png to
refresh the screenshot of the accordion in docs/webui.md.
"""

import os
import shutil
import socket
from pathlib import Path

import pytest
import yaml
from board_helpers import REPO, Board

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "headless Chromium is not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, but CI installs it: .ci/run must run that step")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,2400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served_board(tmp_path, monkeypatch):
    """LlamaBoard served on 127.0.0.1, with a saved board config holding the model and data (not MoFaSGD)."""
    from llamafactory.extras.constants import SUPPORTED_MODELS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    (tmp_path / "llamaboard_config").mkdir()
    config = {
        "top.model_name": next(iter(SUPPORTED_MODELS)),  # the model-name dropdown takes listed names only
        "top.finetuning_type": "full",
        "train.dataset_dir": str(REPO / "data"),
        "train.dataset": ["tulu3_demo"],
    }
    with open(tmp_path / "llamaboard_config" / "board.yaml", "w") as f:
        yaml.safe_dump(config, f)
    board = Board()
    port = _free_port()
    board.demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield board, f"http://127.0.0.1:{port}/"
    finally:
        board.demo.close()


def test_browser_opens_accordion_sets_rank_and_previews_use_mfsgd(served_board, browser, tmp_path):
    from llamafactory.webui.locales import ALERTS
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    board, url = served_board
    wait = WebDriverWait(browser, WAIT_S)

    def element(elem_id: str):
        return wait.until(seen.presence_of_element_located((By.ID, f"component-{board.elem(elem_id)._id}")))

    def output_box_shows(text: str):
        return wait.until(lambda _: text in element("train.output_box").text)

    browser.get(url)
    accordion = element("train.mfsgd_tab")
    wait.until(lambda _: "MoFaSGD configurations" in accordion.text)  # labels arrive with the language

    # the model, method and data from the saved board config, through Load arguments
    config_path = element("train.config_path").find_element(By.TAG_NAME, "input")
    config_path.send_keys(Keys.CONTROL, "a")
    config_path.send_keys("board.yaml", Keys.ENTER)
    element("train.arg_load_btn").click()
    output_box_shows(ALERTS["info_config_loaded"]["en"])
    wait.until(lambda _: element("top.model_path").find_element(By.TAG_NAME, "textarea").get_attribute("value"))

    accordion.find_element(By.CSS_SELECTOR, "button.label-wrap").click()
    use_mfsgd = element("train.use_mfsgd").find_element(By.CSS_SELECTOR, "input[type=checkbox]")
    wait.until(lambda _: use_mfsgd.is_displayed())
    use_mfsgd.click()
    rank = element("train.mfsgd_rank").find_element(By.CSS_SELECTOR, "input[type=number]")
    rank.send_keys(Keys.CONTROL, "a")
    rank.send_keys("16", Keys.ENTER)
    shot = Path(os.environ.get("MFSGD_WEBUI_SCREENSHOT") or tmp_path / "webui_mfsgd.png")
    browser.execute_script("document.activeElement.blur(); arguments[0].scrollIntoView();", accordion)
    assert accordion.screenshot(str(shot)) and shot.stat().st_size > 10_000
    fused = element("train.mfsgd_fused").find_element(By.CSS_SELECTOR, "input[type=checkbox]")
    fused.click()  # off: the preview must say so

    element("train.cmd_preview_btn").click()
    output_box_shows("llamafactory-cli train")
    command = element("train.output_box").text
    assert "--use_mfsgd True" in command and "--mfsgd_rank 16" in command, command
    assert "--mfsgd_fused False" in command and "--finetuning_type full" in command, command
