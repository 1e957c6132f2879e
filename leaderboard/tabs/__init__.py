"""One module per tab of the leaderboard page, each with one ``*_tab(...)`` function that draws it."""
