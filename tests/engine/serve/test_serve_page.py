"""The page at ``GET /`` in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
selenium): type a prompt, watch the progress, play the video. Marked ``browser``; skipped with the reason where
Chromium, its driver or selenium is missing (CI: ``apt-get install -y chromium chromium-driver``)."""

import shutil
import tempfile
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("imageio_ffmpeg")

from benchmarks.serve_load import ServerProcess  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_page_makes_and_plays_a_video(tmp_path, browser):
    from selenium.webdriver.common.by import By

    server = ServerProcess(str(tmp_path / "store"), ["--model", "default", "--threads", "1"]).start()
    try:
        server.wait_ready()
        browser.get(server.url + "/")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a blue square moving down")
        browser.find_element(By.ID, "steps").send_keys("2")
        browser.find_element(By.ID, "seed").send_keys("3")
        browser.find_element(By.ID, "submit").click()
        seen = set()

        def finished():
            seen.add(browser.find_element(By.ID, "progress").get_attribute("value"))
            return "completed" in browser.find_element(By.ID, "status").text

        wait_for(finished, 300, "the job to complete on the page")
        assert browser.find_element(By.ID, "error").text == ""
        video = browser.find_element(By.ID, "video")
        duration = wait_for(lambda: browser.execute_script(
            "const v = arguments[0]; return v.readyState >= 1 ? v.duration : null;", video), 30,
            "the video to load in the player")
        assert browser.execute_script("return arguments[0].error", video) is None
        assert abs(duration - 16 / 8) < 0.2  # 16 frames at 8 fps
        assert video.get_attribute("src").startswith("blob:") and video.is_displayed()
        assert browser.find_element(By.ID, "progress").get_attribute("value") == "100"
        assert len(seen) >= 2  # the bar moved while the job ran
        # A bad value shows the server's one-line message and makes no job.
        prompt.clear()
        prompt.send_keys("circle " * 40)
        browser.find_element(By.ID, "submit").click()
        message = wait_for(lambda: browser.find_element(By.ID, "error").text, 30, "the error message")
        assert message.startswith("prompt is too long for the text encoder: 42 tokens, at most 32"), message
    finally:
        server.terminate()
