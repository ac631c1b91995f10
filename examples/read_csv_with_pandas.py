"""Write a CSV into the cluster with pandas, read it back by URL, and list its prefix.

    DSML_CONFIG=path/to/dsml.yaml python examples/read_csv_with_pandas.py

The cluster is found as the ``dsml`` command finds it (its argument's config, else
$DSML_CONFIG, else etc/dsml.yaml), so the storage options below can be left out when
the config is found; pass ``{"config": ...}`` or ``{"host", "port", "token"}`` to name
another cluster.
"""

import os

import fsspec
import pandas as pd

options = {"config": os.environ["DSML_CONFIG"]} if "DSML_CONFIG" in os.environ else {}

df = pd.DataFrame({"lr": [0.1, 0.01, 0.001], "loss": [0.92, 0.41, 0.57]})
df.to_csv("dsml://examples/sweep/results.csv", index=False, storage_options=options)

back = pd.read_csv("dsml://examples/sweep/results.csv", storage_options=options)
print(back.sort_values("loss").head(1).to_string(index=False))

fs = fsspec.filesystem("dsml", **options)
print(fs.ls("examples/sweep", detail=False))
