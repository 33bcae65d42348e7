"""Loading the recipe's data sources into `datasets.Dataset` splits."""
