"""Headless Debian `chromium` through `chromium-driver` for the browser tests (selenium; no browser download)."""
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM, DRIVER = shutil.which('chromium') or shutil.which('chromium-browser'), shutil.which('chromedriver')
needs_chrome = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason='needs chromium and chromium-driver (apt-get install chromium chromium-driver)')


@contextmanager
def chrome(profile: Path):
    "A headless Chromium driven by selenium, its profile in `profile`; quit on exit."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--window-size=1400,1000',
              f'--user-data-dir={profile}'):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try: yield d
    finally: d.quit()
