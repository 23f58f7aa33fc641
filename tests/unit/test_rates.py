from __future__ import annotations

import pytest

import quotagate as qg


@pytest.mark.parametrize(
    ("text", "amount", "period"),
    [
        ("60/minute", 60, 60.0),
        ("60 per minute", 60, 60.0),
        ("10/second", 10, 1.0),
        ("1000/day", 1000, 86400.0),
        ("100/5 minutes", 100, 300.0),
        ("100 per 5 minutes", 100, 300.0),
        ("3/hours", 3, 3600.0),
        (" 7 / MINUTE ", 7, 60.0),
        ("2/2 weeks", 2, 14 * 86400.0),
        ("10/s", 10, 1.0),
        ("10/sec", 10, 1.0),
        ("60/min", 60, 60.0),
        ("60 per min", 60, 60.0),
        ("60/h", 60, 3600.0),
        ("60/hr", 60, 3600.0),
        ("1000/d", 1000, 86400.0),
        ("5/month", 5, 30 * 86400.0),  # as limits and slowapi count a month
        ("5/2 months", 5, 60 * 86400.0),
        ("100/year", 100, 360 * 86400.0),
        ("100 per years", 100, 360 * 86400.0),
    ],
)
def test_parse_one(text: str, amount: int, period: float) -> None:
    assert qg.parse_rates(text) == (qg.Rate(amount, period),)


@pytest.mark.parametrize("separator", [";", ",", " ; "])
def test_parse_several(separator: str) -> None:
    assert qg.parse_rates(f"60/minute{separator}1000/day") == (
        qg.Rate(60, 60.0),
        qg.Rate(1000, 86400.0),
    )


@pytest.mark.parametrize(
    "text",
    [
        "60 per min utes",
        "sixty/minute",
        "60/fortnight",
        "60/m",  # minute or month? refused, not guessed
        "",
        ";",
        "0/minute",
        "-1/minute",
        "60",
    ],
)
def test_bad_text_raises_config_error_naming_it(text: str) -> None:
    with pytest.raises(qg.ConfigError) as info:
        qg.parse_rates(text)
    assert text.strip() in str(info.value)


def test_unknown_unit_message_lists_units() -> None:
    with pytest.raises(qg.ConfigError, match=r"unknown time unit 'fortnight'.*minute"):
        qg.parse_rate("60/fortnight")


def test_rate_renders_back() -> None:
    text = "60/minute; 100/5 minutes; 90/90 seconds; 10/s; 5/month; 1/year"
    assert [str(r) for r in qg.parse_rates(text)] == [
        "60/minute",
        "100/5 minutes",
        "90/90 seconds",
        "10/second",
        "5/month",
        "1/year",
    ]


def test_emission_interval_and_microseconds() -> None:
    rate = qg.parse_rate("10/minute")
    assert rate.emission_interval == 6.0
    assert rate.interval_us == 6_000_000
    assert rate.period_us == 60_000_000


def test_rate_validates_its_fields() -> None:
    with pytest.raises(qg.ConfigError):
        qg.Rate(0, 60.0)
    with pytest.raises(qg.ConfigError):
        qg.Rate(10, 0.0)
