"""Small synthetic files in the H&M and Fashion Product formats, with injected bad rows.

Not competition data: every value is made up.
"""

from __future__ import annotations

from pathlib import Path

ARTICLE_HEADER = (
    "article_id,product_code,prod_name,product_type_no,product_type_name,product_group_name,"
    "graphical_appearance_no,graphical_appearance_name,colour_group_code,colour_group_name,"
    "perceived_colour_value_id,perceived_colour_value_name,perceived_colour_master_id,"
    "perceived_colour_master_name,department_no,department_name,index_code,index_name,"
    "index_group_no,index_group_name,section_no,section_name,garment_group_no,garment_group_name,detail_desc"
)


def article(article_id: str, product: str, name: str, ptype: str, colour: str, desc: str = "Soft cotton.") -> str:
    return (
        f"{article_id},{product},{name},1,{ptype},Garment Upper body,1,Solid,09,{colour},4,Dark,5,{colour},"
        f"1,Jersey,A,Ladieswear,1,Ladieswear,16,Womens Basics,1002,Jersey Basic,{desc}"
    )


CUSTOMER_A = "a" * 64
CUSTOMER_B = "b" * 64


def write_hm(root: Path) -> dict[str, list[tuple[int, str]]]:
    """Write articles/customers/transactions with bad rows; return the expected rejects
    per file as ``(record number, reason fragment)`` (the header is record 1)."""
    root.mkdir(parents=True, exist_ok=True)
    articles = [
        ARTICLE_HEADER,
        article("0100000001", "0100000", "Strap top", "Vest top", "Black"),
        article("0100000002", "0100000", "Strap top", "Vest top", "White"),
        article("0200000001", "0200000", "Slim jeans", "Trousers", "Blue", '"Denim, 5-pocket."'),
        "12345,0300000,Short id,1,T-shirt,G,1,S,09,Red,4,D,5,Red,1,J,A,L,1,L,16,W,1002,J,x",
        article("0100000001", "0100000", "Duplicate", "Vest top", "Black"),
        "0400000001,0400000,Too few fields",
        article("0500000001", "0500000", "Hoodie", "Hoodie", "Grey", ""),
        # RFC 4180: a quoted description spanning two lines is one record (record 9, lines 9-10)
        article("0600000001", "0600000", "Long tee", "T-shirt", "White", '"Soft\ncotton, ""long""."'),
        # a byte that is not UTF-8 in the name: record 10 (line 11)
        article("0700000001", "0700000", "Bad BYTE name", "T-shirt", "Red"),
    ]
    data = ("\n".join(articles) + "\n").encode().replace(b"BYTE", b"\xff")
    (root / "articles.csv").write_bytes(data)
    customers = [
        "customer_id,FN,Active,club_member_status,fashion_news_frequency,age,postal_code",
        f"{CUSTOMER_A},1.0,1.0,ACTIVE,Regularly,31,p1",
        f"{CUSTOMER_B},,,ACTIVE,NONE,,p2",
        f"{'c' * 64},,,ACTIVE,NONE,abc,p3",
        "not-a-customer,,,ACTIVE,NONE,40,p4",
        f"{'e' * 64},nan,,ACTIVE,NONE,25,p5",
    ]
    (root / "customers.csv").write_text("\n".join(customers) + "\n")
    transactions = [
        "t_dat,customer_id,article_id,price,sales_channel_id",
        f"2020-09-01,{CUSTOMER_A},0100000001,0.0305,2",
        f"2020-09-01,{CUSTOMER_A},0100000001,0.0305,2",  # a second unit: kept, not a duplicate
        f"2020-09-02,{CUSTOMER_B},0200000001,0.05,1",
        f"2020-13-02,{CUSTOMER_B},0200000001,0.05,1",
        f"2020-09-03,{CUSTOMER_B},0200000001,free,1",
        f"2020-09-03,{CUSTOMER_B}",
        f"2020-09-04,{CUSTOMER_B},0999999999,0.05,1",
        f"2020-09-04,{'d' * 64},0200000001,0.05,1",
        f"2020-09-02,{CUSTOMER_A},0100000002,inf,1",
        f"2099-01-01,{CUSTOMER_A},0100000001,0.03,1",  # later than any run date in the tests
    ]
    (root / "transactions_train.csv").write_text("\n".join(transactions) + "\n")
    return {
        "articles.csv": [(5, "bad article_id '12345'"), (6, "duplicate article_id (first at row 2)"),
                         (7, "wrong field count: expected 25, got 3"),
                         (10, "bytes not valid UTF-8 in column prod_name")],
        "customers.csv": [(4, "bad age 'abc'"), (5, "bad customer_id 'not-a-customer'"), (6, "bad FN 'nan'")],
        "transactions_train.csv": [(5, "unparsable t_dat '2020-13-02'"), (6, "unparsable price 'free'"),
                                   (7, "wrong field count: expected 5, got 2"),
                                   (8, "unknown article_id 0999999999"),
                                   (9, f"unknown customer_id {'d' * 64}"),
                                   (10, "unparsable price 'inf'"), (11, "t_dat 2099-01-01 is after the run date")],
    }


STYLES_HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def write_fashion(root: Path, images_from: Path | None = None) -> dict[str, list[tuple[int, str]]]:
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        STYLES_HEADER,
        "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",
        "23100,Men,Accessories,Accessories,Accessory Gift Set,Navy Blue,Fall,2011,Formal,Turtle Men Navy Tie, Cufflink and Pocket Square Combo Set",
        "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,NA,NA,Peter England Men Party Blue Jeans",
        "x1,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,Bad id",
        "59263,Women,Accessories",
        "53759,Men,Apparel,Topwear,Tshirts,Grey,Summer,20x1,Casual,Bad year",
    ]
    (root / "styles.csv").write_text("\n".join(lines) + "\n")
    (root / "images").mkdir(exist_ok=True)
    if images_from is not None:  # any two real JPEGs, named after two of the rows
        sources = sorted(images_from.glob("*.jpg"))[:2]
        for name, source in zip(("15970.jpg", "39386.jpg"), sources):
            (root / "images" / name).write_bytes(source.read_bytes())
    return {
        "styles.csv": [(5, "bad id 'x1'"), (6, "wrong field count: expected 10, got 3"), (7, "bad year '20x1'")],
    }
