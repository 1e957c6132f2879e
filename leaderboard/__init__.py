"""The leaderboard: a read-only Streamlit page over the results store, and the numbers behind it.

Streamlit-free (unit-tested without a page): ``store`` (read-only connections and loaders), ``suites``
(what each suite measures), ``runs`` (filters, router order), ``stats`` (mean ± CI over distinct seeds,
Welch), ``formatting``, ``overview`` (the Leaderboard tab's table), ``tables`` (curves, lm-eval, bench) and
``claims`` (the papers' claims and their verdict, also ``harness claims``). The page: ``app`` (entry point),
``sidebar``, ``ui`` (shared cached reads, colours, charts) and ``tabs/`` (one module per tab).
"""
