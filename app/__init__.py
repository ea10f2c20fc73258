"""The Dash app (installed as moewatch.app)."""


def create_app(root, refresh_seconds: float = 5.0):
    raise NotImplementedError("the dashboard is not built yet")
