"""The repairs' keys in table order and their names in words: a leaf module, so the verdict's
wording can name a repair without importing the repairs themselves (which read thresholds)."""

#: Repairs in the order of the table; "+" joins what is combined.
REPAIRS = ("baseline", "eora", "early", "kurtosis", "early+amplify", "early+eora")
REPAIR_NAMES = {
    "baseline": "no repair",
    "eora": "EoRA",
    "early": "early protection",
    "kurtosis": "kurtosis protection",
    "early+amplify": "early protection + amplification",
    "early+eora": "early protection + EoRA",
}
