#!/usr/bin/env python3
"""The demo chat and the console in headless Chromium, as a person would use them.

    python3 tests/browser/web_test.py --http 127.0.0.1:7480 --ops-token TOKEN \\
        --kill-pid PID --killed-node n2 [--screenshots DIR]

Run by tests/browser.rs against a real 3-node cluster (the page comes from the first node):
  1. two tabs as amy and bob: bob's five messages show in amy's tab in order, and in a second
     tab of amy (another device) in the same order;
  2. amy's tab reloads: the earlier messages are shown again and a new one follows, once;
  3. the process --kill-pid (another node) is killed: messages sent afterwards still arrive;
  4. the console lists every member, and marks the killed node down.
Prints one line per step; exits non-zero with the reason when a check fails.
"""
import argparse
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def browser():
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(a)
    for b in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(b):
            opts.binary_location = b
    driver = "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(driver) if os.path.exists(driver) else Service(), options=opts)


def wait(what, check, secs=20):
    end = time.time() + secs
    while True:
        try:
            v = check()
            if v:
                return v
        except Exception:  # the page may be between states
            pass
        if time.time() > end:
            raise SystemExit(f"FAILED: timed out after {secs} s waiting for {what}")
        time.sleep(0.1)


def log_lines(d):
    return [(int(li.get_attribute("data-seq")), li.find_element(By.CLASS_NAME, "text").text)
            for li in d.find_elements(By.CSS_SELECTOR, "#log li")]


def state(d):
    return d.find_element(By.ID, "state").text


def send(d, to, text):
    form = d.find_element(By.ID, "send")
    form.find_element(By.NAME, "to").clear()
    form.find_element(By.NAME, "to").send_keys(to)
    form.find_element(By.NAME, "text").send_keys(text)
    form.find_element(By.TAG_NAME, "button").click()


def check_order(lines, texts, who):
    got = [t for _, t in lines]
    seqs = [s for s, _ in lines]
    if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
        raise SystemExit(f"FAILED: {who} shows seqs out of order or twice: {seqs}")
    if got != texts:
        raise SystemExit(f"FAILED: {who} shows {got}, expected {texts}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--http", required=True)
    p.add_argument("--ops-token", required=True)
    p.add_argument("--kill-pid", type=int, required=True)
    p.add_argument("--killed-node", required=True)
    p.add_argument("--screenshots")
    a = p.parse_args()
    base = f"http://{a.http}"
    d = browser()
    try:
        d.get(f"{base}/demo/?user=amy")
        amy = d.current_window_handle
        wait("amy's tab to connect", lambda: state(d) == "open")
        d.switch_to.new_window("tab")
        d.get(f"{base}/demo/?user=bob")
        bob = d.current_window_handle
        wait("bob's tab to connect", lambda: state(d) == "open")
        texts = [f"hello amy {i}" for i in range(1, 6)]
        for t in texts:
            send(d, "amy", t)
            wait(f"bob's own copy of {t!r}", lambda: any(x == t for _, x in log_lines(d)))
        d.switch_to.window(amy)
        wait("five messages in amy's tab", lambda: len(log_lines(d)) >= 5)
        check_order(log_lines(d), texts, "amy's tab")
        print("demo: bob's five messages shown in amy's tab in order", flush=True)

        d.switch_to.new_window("tab")
        d.get(f"{base}/demo/?user=amy")
        wait("amy's second tab", lambda: len(log_lines(d)) >= 5)
        check_order(log_lines(d), texts, "amy's second tab")
        amy2 = d.current_window_handle
        print("demo: a second tab of amy shows the same messages in the same order", flush=True)

        d.switch_to.window(amy)
        d.refresh()
        wait("amy's tab after the reload", lambda: state(d) == "open" and len(log_lines(d)) >= 5)
        d.switch_to.window(bob)
        send(d, "amy", "after the reload")
        d.switch_to.window(amy)
        wait("the message after the reload", lambda: len(log_lines(d)) >= 6)
        time.sleep(0.5)
        check_order(log_lines(d), texts + ["after the reload"], "amy's tab after the reload")
        print("demo: after a reload amy's tab shows the history and the next message, once", flush=True)

        os.kill(a.kill_pid, 9)
        d.switch_to.window(bob)
        more = [f"after the kill {i}" for i in range(1, 4)]
        for t in more:
            send(d, "amy", t)
            wait(f"bob's own copy of {t!r}", lambda: any(x == t for _, x in log_lines(d)), secs=30)
        for handle, who in ((amy, "amy's tab"), (amy2, "amy's second tab")):
            d.switch_to.window(handle)
            wait(f"the messages after the kill in {who}", lambda: len(log_lines(d)) >= 9, secs=30)
            check_order(log_lines(d), texts + ["after the reload"] + more, who)
        print(f"demo: messages sent after {a.killed_node} was killed arrive in order on both of amy's tabs", flush=True)
        if a.screenshots:
            d.switch_to.window(amy)
            d.save_screenshot(os.path.join(a.screenshots, "web-demo.png"))

        d.switch_to.new_window("tab")
        d.get(f"{base}/console/#token={a.ops_token}")
        rows = wait("the console's member list",
                    lambda: d.find_elements(By.CSS_SELECTOR, "#members tbody tr") or None)
        wait(f"{a.killed_node} marked down", lambda: any(
            r.get_attribute("data-node") == a.killed_node and r.get_attribute("data-state") == "down"
            for r in d.find_elements(By.CSS_SELECTOR, "#members tbody tr")), secs=30)
        rows = {r.get_attribute("data-node"): r.get_attribute("data-state")
                for r in d.find_elements(By.CSS_SELECTOR, "#members tbody tr")}
        cells = d.find_elements(By.CSS_SELECTOR, "#grid .cell")
        if len(cells) != 64:
            raise SystemExit(f"FAILED: the console shows {len(cells)} partitions, not 64")
        print(f"console: members {sorted(rows.items())}; 64 partitions", flush=True)
        if a.screenshots:
            time.sleep(4)  # two samples for the charts
            d.save_screenshot(os.path.join(a.screenshots, "web-console.png"))
    finally:
        d.quit()


if __name__ == "__main__":
    sys.exit(main())
