"""clickscore training: data preparation, simulation, models, evaluation, export (needs clickscore[train])."""
