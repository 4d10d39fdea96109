"""The one exception family crossjax raises for bad input: each message names the problem and the fix."""


class CrossjaxError(ValueError):
    """Bad input or state that the user can fix; the message says how."""
