"""Runner services and the generation engine behind them."""
