"""The expert catalog: names unique per namespace, pagination and filters, durable across opens."""

import pytest

from srmoa_dist.experts.catalog import CatalogEntry, ExpertCatalog, NameTakenError


def test_put_get_names_and_reopen(tmp_path):
    cat = ExpertCatalog.of(tmp_path)
    cat.put(CatalogEntry(3, "a", "import", name="math", examples=("What is 2+2?",)))
    cat.put(CatalogEntry(4, "b", "import", name="math"))               # same name, other namespace
    cat.put(CatalogEntry(5, "a", "edit", edit_id="e1"))
    cat.put(CatalogEntry(6, "a", "edit"))                              # unnamed edits do not collide
    with pytest.raises(NameTakenError, match="math"):
        cat.put(CatalogEntry(7, "a", "import", name="math"))
    again = ExpertCatalog.of(tmp_path)
    assert again.get(3).examples == ("What is 2+2?",) and again.get(3).name == "math"
    assert again.by_name("b", "math").id == 4 and again.by_name("a", "nope") is None
    assert again.get(7) is None
    assert again.counts() == {"a": {"import": 1, "edit": 2}, "b": {"import": 1}}
    assert again.remove(3) and not again.remove(3)
    again.put(CatalogEntry(7, "a", "import", name="math"))             # the name is free again


def test_list_pages_and_filters(tmp_path):
    cat = ExpertCatalog.of(tmp_path)
    for i in range(7):
        cat.put(CatalogEntry(i, "a" if i % 2 else "b", "edit" if i < 4 else "import",
                             name=f"n{i}" if i > 2 else None))
    page, more = cat.list(limit=3)
    assert [e.id for e in page] == [0, 1, 2] and more
    page, more = cat.list(limit=3, after=2)
    assert [e.id for e in page] == [3, 4, 5] and more
    page, more = cat.list(limit=3, after=5)
    assert [e.id for e in page] == [6] and not more
    assert [e.id for e in cat.list(namespaces={"a"})[0]] == [1, 3, 5]
    assert [e.id for e in cat.list(origin="import", namespaces={"b"})[0]] == [4, 6]
    assert [e.id for e in cat.list(named=True, namespaces={"a", "b"})[0]] == [3, 4, 5, 6]
    assert cat.list(namespaces=set())[0] == []
    with pytest.raises(ValueError, match="limit"):
        cat.list(limit=0)
    with pytest.raises(ValueError, match="origin"):
        cat.list(origin="other")


def test_entry_validation():
    with pytest.raises(ValueError, match="origin"):
        CatalogEntry(1, "a", "made-up")
    with pytest.raises(ValueError, match="name"):
        CatalogEntry(1, "a", "import", name="has space")
    with pytest.raises(ValueError, match="namespace"):
        CatalogEntry(1, "", "import")
    with pytest.raises(ValueError, match="id"):
        CatalogEntry(-1, "a", "import")


def test_list_refuses_a_cursor_beyond_sqlite_integers(tmp_path):
    cat = ExpertCatalog.of(tmp_path)
    cat.put(CatalogEntry(1, "a", "edit"))
    with pytest.raises(ValueError, match="after must be an expert id"):
        cat.list(limit=3, after=2**63)
    assert [e.id for e in cat.list(limit=3, after=-1)[0]] == [1]
