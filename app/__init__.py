"""The Dash app (installed as moewatch.app)."""
