"""`dail view`: the trace page, driven in a real headless Chromium (hover, filter)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from dail.cli import main


def run_cli(*argv):
    return main([str(a) for a in argv])


def visible(text: str) -> str:
    """Control characters as the page shows them: U+2400 + code (tab and newline kept)."""
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 32 and c not in "\t\n" else
                   "\u2421" if c == "\x7f" else c for c in text)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through selenium; skipped when there is none, unless
    DAIL_REQUIRE_BROWSER is set (CI sets it), where a missing browser fails the test."""
    def missing(why: str):
        if os.environ.get("DAIL_REQUIRE_BROWSER"):
            pytest.fail(f"{why}, and DAIL_REQUIRE_BROWSER is set")
        pytest.skip(f"{why} (apt-get install chromium chromium-driver; pip install -e '.[dev]'); "
                    "set DAIL_REQUIRE_BROWSER=1 to fail instead")

    try:
        from selenium import webdriver
    except ImportError:
        missing("selenium is not installed")
    binary = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                   if (path := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        missing("no Chromium and chromedriver on PATH")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def generated(tiny_model_dir, tmp_path_factory):
    """Traces of three problems x 3 samples from a real rollout, and their page (2 per problem)."""
    from tests.conftest import PROBLEMS

    root = tmp_path_factory.mktemp("view")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    assert run_cli("generate", "--model", tiny_model_dir, "--data", data, "--out", root / "gen",
                   "--samples", 3, "--max-new-tokens", 24, "--tau", 0.05) == 0
    traces = [json.loads(line) for line in (root / "gen" / "traces.jsonl").read_text().splitlines()]
    page = root / "page.html"
    # No --model: the tokenizer comes from the model named in generate_config.json.
    assert run_cli("view", root / "gen" / "traces.jsonl", "--out", page, "--per-problem", 2) == 0
    return traces, page


def test_every_shown_token_is_one_element_with_its_source(browser, generated, tiny):
    from selenium.webdriver.common.by import By

    traces, page = generated
    _, tokenizer = tiny
    browser.get(page.as_uri())
    shown = [t for t in traces if t["sample"] < 2]
    assert len(browser.find_elements(By.CSS_SELECTOR, "span[data-source]")) == sum(len(t["token_ids"]) for t in shown)
    for trace in shown:
        box = browser.find_element(By.CSS_SELECTOR, f'section[data-problem="{trace["id"]}"] '
                                                    f'.trace[data-sample="{trace["sample"]}"]')
        spans = box.find_elements(By.CSS_SELECTOR, "span[data-source]")
        assert "".join(s.get_attribute("data-source") for s in spans) == trace["sources"]
        text = browser.execute_script("return arguments[0].querySelector('.tokens').textContent", box)
        assert text == visible(tokenizer.decode(trace["token_ids"]))
    # Nothing but the file itself was loaded: no stylesheet, script or font from anywhere.
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert not re.search(r"\b(src|href)\s*=", page.read_text())


def test_problem_summary_acceptance_answer_correctness(browser, generated):
    from selenium.webdriver.common.by import By

    traces, page = generated
    browser.get(page.as_uri())
    for pid in ("add", "div", "proof"):
        mine = [t for t in traces if t["id"] == pid]
        section = browser.find_element(By.CSS_SELECTOR, f'section[data-problem="{pid}"]')
        mean = sum(t["acceptance_rate"] for t in mine) / len(mine)
        assert section.find_element(By.CLASS_NAME, "acceptance").text == f"{mean:.3f}"
        assert section.find_element(By.CLASS_NAME, "gold").text == (mine[0]["gold"] or "none")
        graded = [t for t in mine if t["correct"] is not None]
        expected = (f"{sum(t['correct'] for t in graded)} of {len(graded)} traces correct" if graded
                    else "no gold answer: not graded")
        assert section.find_element(By.CLASS_NAME, "correctness").text == expected
        assert "showing 2 of 3 traces" in section.text
        assert len(section.find_elements(By.CLASS_NAME, "trace")) == 2


def test_hover_shows_the_proposal_and_its_privileged_probability(browser, generated, tiny):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    traces, page = generated
    _, tokenizer = tiny
    browser.get(page.as_uri())
    tip = browser.find_element(By.ID, "tip")
    assert not tip.is_displayed()
    found = set()
    for trace in (t for t in traces if t["sample"] < 2):
        box = browser.find_element(By.CSS_SELECTOR, f'section[data-problem="{trace["id"]}"] '
                                                    f'.trace[data-sample="{trace["sample"]}"]')
        spans = box.find_elements(By.CSS_SELECTOR, "span[data-source]")
        for j, source in enumerate(trace["sources"]):
            proposal, prob = trace["proposal_ids"][j], trace["proposal_probs"][j]
            if proposal is None or source in found or not spans[j].text.strip():
                continue
            ActionChains(browser).move_to_element(spans[j]).perform()
            assert tip.is_displayed()
            assert f"student proposed: {json.dumps(visible(tokenizer.decode([proposal])))}" in tip.text
            assert f"privileged probability of the proposal: {prob:.4f}" in tip.text
            assert tip.text.startswith("S: the student's proposal, accepted" if source == "S"
                                       else "P: sampled by the privileged model")
            found.add(source)
    assert found == {"S", "P"}, "the traces hold no accepted and rejected proposal to hover"


def test_filter_by_problem(browser, generated):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, page = generated
    browser.get(page.as_uri())
    menu = Select(browser.find_element(By.ID, "problem-filter"))
    assert [o.text for o in menu.options] == ["all problems", "add", "div", "proof"]

    def visible():
        return [s.get_attribute("data-problem") for s in browser.find_elements(By.CSS_SELECTOR, "section.problem")
                if s.is_displayed()]

    assert visible() == ["add", "div", "proof"]
    menu.select_by_value("div")
    assert visible() == ["div"]
    menu.select_by_value("")
    assert visible() == ["add", "div", "proof"]


def test_view_refuses_bad_input_before_writing(tmp_path, tiny_model_dir, capsys):
    traces = tmp_path / "t.jsonl"
    traces.write_text(json.dumps({"id": "a", "token_ids": [1, 2], "sources": "S"}) + "\n")
    out = tmp_path / "page.html"
    assert run_cli("view", traces, "--out", out, "--model", tiny_model_dir) == 2
    assert f"{traces}:1: field 'sources' must hold one S or P per token (2)" in capsys.readouterr().err
    traces.write_text(json.dumps({"id": "a", "token_ids": [1, 2], "sources": "SP"}) + "\n")
    assert run_cli("view", traces, "--out", out) == 2
    assert "pass --model" in capsys.readouterr().err
    assert run_cli("view", traces, "--out", out, "--model", tiny_model_dir, "--per-problem", -1) == 2
    assert "--per-problem -1: out of range; allowed: >= 0" in capsys.readouterr().err
    assert not out.exists()
    assert run_cli("view", traces, "--out", out, "--model", tiny_model_dir, "--per-problem", 0) == 0
    assert out.read_text().count("<span data-source=") == 2
