"""Reports over the results store: leaderboard (table, Markdown, HTML page) and recommendations."""
