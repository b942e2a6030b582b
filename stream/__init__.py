"""clickscore serving: event contract, feature encoding, Faust worker. Never imports torch."""
