"""Facts about the Criteo click logs that every stage shares (layout, names, published sizes)."""

from __future__ import annotations

INT_FEATURE_COUNT = 13
CAT_FEATURE_COUNT = 26
INT_COLUMNS = [f"int_{i}" for i in range(INT_FEATURE_COUNT)]
CAT_COLUMNS = [f"cat_{i}" for i in range(CAT_FEATURE_COUNT)]
LABELED_COLUMNS = ["label", *INT_COLUMNS, *CAT_COLUMNS]  # 40 fields: Kaggle train.txt, 1TB day_N
UNLABELED_COLUMNS = [*INT_COLUMNS, *CAT_COLUMNS]  # 39 fields: Kaggle test.txt
DENSE_TRANSFORM = "log1p(max(x, 0)) as float32; missing -> 0"  # of every integer field, by dlrm-preprocess

# Distinct values per categorical feature in the Criteo Kaggle train.txt (as published with the DLRM
# reference implementation; 33,762,577 rows in all).
KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip


# Criteo 1TB: distinct raw values per feature over its 24 days (882,774,559 in all)
TERABYTE_CARDINALITIES = [
    227605432, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 130229467, 3067956, 405282, 10, 2209,
    11938, 155, 4, 976, 14, 292775614, 40790948, 187188510, 590152, 12973, 108, 36,
]  # fmt: skip
CARDINALITY_PROFILES = {"kaggle": KAGGLE_CARDINALITIES, "terabyte": TERABYTE_CARDINALITIES}


def table_name(feature: str) -> str:
    """TorchRec's DLRM convention: feature ``cat_3`` lives in table ``t_cat_3``."""
    return f"t_{feature}"
