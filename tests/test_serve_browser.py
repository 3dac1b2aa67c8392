"""The server's page in a real headless browser (Debian's Chromium through its chromedriver):
pick a video with the page's own form (and, for a class-text model, type label names into it),
submit, read the predicted class from the page."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from deploy_helpers import Server, make_tiny_model_folder, make_tiny_text_model_folder, write_test_videos  # noqa: E402

from dist_video.engine.predict import predict_files  # noqa: E402
from dist_video.loading import load_model  # noqa: E402

pytestmark = pytest.mark.slow


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless browser test skipped: Chromium and chromedriver are not installed "
                    "(Debian: apt-get install chromium chromium-driver; .ci/run does this)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("headless browser test skipped: selenium is not installed (pip install -e '.[test]')")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_classifies_a_video_picked_in_its_form(browser, tmp_path, tiny_clip):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    folder = make_tiny_model_folder(tmp_path / "model", tiny_clip)
    video = write_test_videos(tmp_path / "videos")[0]
    loaded = load_model(str(folder), device="cpu", clip_dtype="fp32")
    model, preprocess = loaded.model, loaded.preprocess
    [want] = predict_files(model, [str(video)], preprocess, topk=5)
    with Server(folder, "--clip-dtype", "fp32", env={"TMPDIR": str(tmp_path)}) as srv:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 30).until(lambda d: "classes" in d.find_element(By.ID, "model-info").text)
        browser.find_element(By.ID, "video-input").send_keys(str(Path(video).resolve()))
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                          in ("done", "error"))
        assert browser.find_element(By.ID, "error").text == ""
        assert browser.find_element(By.ID, "top-class").text == want["top"][0]["class"]
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .class-name")]
        assert shown == [t["class"] for t in want["top"]]
        if os.environ.get("DIST_VIDEO_SCREENSHOT"):  # the README's picture of the page
            browser.save_screenshot(os.environ["DIST_VIDEO_SCREENSHOT"])


def test_the_page_sends_the_labels_typed_into_its_form(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    folder = make_tiny_text_model_folder(tmp_path / "model")
    video = write_test_videos(tmp_path / "videos")[1]
    labels = ["surfing", "archery", "washing dishes"]
    loaded = load_model(str(folder), labels=", ".join(labels), device="cpu", clip_dtype="fp32")
    model, preprocess = loaded.model, loaded.preprocess
    [want] = predict_files(model, [str(video)], preprocess, topk=5)
    with Server(folder, "--clip-dtype", "fp32", env={"TMPDIR": str(tmp_path)}) as srv:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 30).until(lambda d: "classes" in d.find_element(By.ID, "model-info").text)
        assert browser.find_element(By.ID, "labels").is_enabled()
        browser.find_element(By.ID, "video-input").send_keys(str(Path(video).resolve()))
        browser.find_element(By.ID, "labels").send_keys(", ".join(labels))
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                          in ("done", "error"))
        assert browser.find_element(By.ID, "error").text == ""
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#bars .class-name")]
        assert shown == [t["class"] for t in want["top"]] and sorted(shown) == sorted(labels)
