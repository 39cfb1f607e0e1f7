"""Drive demo.py in a real browser: headless Chromium (Debian's chromium + chromium-driver) via Selenium.

Used by the browser test and to take the README screenshot:

    python scripts/browser.py --checkpoint CKPT_OR_EXPORT --image photo.png [--direction A2B] \
        --screenshot assets/demo_page.png

starts the demo on a free port, uploads the image, presses Translate, waits for the result and
saves a screenshot of the page.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ('chromium', 'chromium-browser', 'google-chrome')


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when either is missing."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which('chromedriver')
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_demo(checkpoint: str | Path, *extra: str, timeout: float = 120) -> Iterator[str]:
    """Start ``demo.py`` on a free port; yields its URL once it answers, stops it afterwards."""
    port = free_port()
    url = f'http://127.0.0.1:{port}/'
    log = tempfile.TemporaryFile('w+')   # not a pipe: a chatty server must never block on a full one
    process = subprocess.Popen([sys.executable, str(REPO / 'demo.py'), '--checkpoint', str(checkpoint),
                                '--port', str(port), '--device', 'cpu', *extra], stdout=log, stderr=subprocess.STDOUT,
                               text=True)
    try:
        _wait_for_page(url, process, log, timeout)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_for_page(url: str, process: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f'demo.py exited with {process.returncode}:\n{log.read()}')
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f'demo.py did not answer at {url} within {timeout:.0f} s')


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator[object]:
    """A Selenium WebDriver on the system's Chromium (no browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    found = find_chromium()
    if found is None:
        raise RuntimeError('no chromium/chromedriver on PATH: apt-get install chromium chromium-driver')
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                f'--window-size={width},{height}'):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def translate_in_page(driver, url: str, image: str | Path, direction: str = 'A2B',
                      timeout: float = 60) -> np.ndarray:
    """Open the demo, upload ``image``, pick the direction, press Translate; returns the shown
    translation's pixels (downloaded from the <img> the page displays)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(driver, timeout)
    driver.get(url)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#input input[type=file]'))
    upload.send_keys(str(Path(image).resolve()))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#input img'))   # the upload is shown
    label = direction.replace('2', ' → ')   # demo.label
    driver.find_element(By.XPATH, f'//*[@id="direction"]//label[normalize-space()="{label}"]').click()
    driver.find_element(By.CSS_SELECTOR, '#translate').click()
    shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#translation img'))[0]
    wait.until(lambda d: d.execute_script('return arguments[0].complete && arguments[0].naturalWidth > 0', shown))
    with urllib.request.urlopen(shown.get_attribute('src'), timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert('RGB'))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Screenshot of the demo page after one translation.')
    parser.add_argument('--checkpoint', required=True)
    parser.add_argument('--image', required=True, type=Path)
    parser.add_argument('--direction', default='A2B', choices=('A2B', 'B2A'))
    parser.add_argument('--screenshot', type=Path, default=REPO / 'assets' / 'demo_page.png')
    parser.add_argument('--width', type=int, default=1280)
    parser.add_argument('--height', type=int, default=820)
    args = parser.parse_args(argv)
    with running_demo(args.checkpoint) as url, headless_chromium(args.width, args.height) as driver:
        translation = translate_in_page(driver, url, args.image, args.direction)
        time.sleep(1)   # let the heatmap and layout settle
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.screenshot))
    print(f'translation {translation.shape[1]}x{translation.shape[0]}; wrote {args.screenshot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
