"""`--query`: a small selection language that cannot run code.

Comparisons of columns with literals (`params > 2e4`, `format == "int4"`, `1e4 <= tokens < 1e6`), membership
(`format in ["int4", "int8"]`, `not in`), combined with `and` / `or` / `not` (or `&`, `|`, `~`) and
parentheses. The text is parsed with Python's `ast` and evaluated as pandas masks node by node; anything else
(attribute access, calls, `@` variables, arithmetic) is an error, never evaluated.
"""
from __future__ import annotations

import ast
import operator

import pandas as pd

from capscale.capacity import InputError

MAX_LENGTH = 2000
COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
               ast.Gt: operator.gt, ast.GtE: operator.ge}


class QueryError(InputError):
    pass


def select(frame: pd.DataFrame, query: str) -> pd.DataFrame:
    """The rows of `frame` where `query` holds."""
    if len(query) > MAX_LENGTH:
        raise QueryError(f"--query is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(query.strip(), mode="eval")
    except SyntaxError as err:
        raise QueryError(f"--query '{query}': not a valid expression ({err.msg})") from None
    mask = _condition(tree.body, frame, query)
    if not isinstance(mask, pd.Series) or mask.dtype != bool:
        raise QueryError(f"--query '{query}': expected a condition such as \"params > 2e4\"")
    return frame[mask]


def _fail(query: str, node: ast.AST, what: str):
    raise QueryError(f"--query '{query}': {what} is not allowed ({ast.unparse(node)!r}); use comparisons of "
                     "columns with literals, in [...], and/or/not")


def _condition(node, frame, query):
    if isinstance(node, ast.BoolOp):
        parts = [_condition(v, frame, query) for v in node.values]
        combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
        result = parts[0]
        for part in parts[1:]:
            result = combine(result, part)
        return result
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
        combine = operator.and_ if isinstance(node.op, ast.BitAnd) else operator.or_
        return combine(_condition(node.left, frame, query), _condition(node.right, frame, query))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
        return ~_condition(node.operand, frame, query)
    if isinstance(node, ast.Compare):
        result, left = None, node.left
        for op, right in zip(node.ops, node.comparators):
            part = _compare(op, left, right, frame, query)
            result = part if result is None else result & part
            left = right
        return result
    _fail(query, node, type(node).__name__)


def _compare(op, left, right, frame, query):
    a = _operand(left, frame, query)
    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(a, pd.Series) or not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
            _fail(query, right, "`in` other than `column in [literals]`")
        inside = a.isin([_literal(v, query) for v in right.elts])
        return inside if isinstance(op, ast.In) else ~inside
    if type(op) not in COMPARISONS:
        _fail(query, op, type(op).__name__)
    b = _operand(right, frame, query)
    try:
        result = COMPARISONS[type(op)](a, b)
    except TypeError as err:
        raise QueryError(f"--query '{query}': cannot compare {ast.unparse(left)!r} with {ast.unparse(right)!r} "
                         f"({err})") from None
    if not isinstance(result, pd.Series):
        _fail(query, right, "a comparison without a column")
    return result.fillna(False).astype(bool)


def _operand(node, frame, query):
    if isinstance(node, ast.Name):
        if node.id not in frame.columns:
            raise QueryError(f"--query '{query}': no column '{node.id}'; columns are {list(frame.columns)}")
        return frame[node.id]
    return _literal(node, query)


def _literal(node, query):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)) or \
            isinstance(node, ast.Constant) and node.value is None:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and \
            isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    _fail(query, node, type(node).__name__)
