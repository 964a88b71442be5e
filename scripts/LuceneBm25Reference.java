// Lucene reference for lever's analyzer and BM25 (see lucene-bm25-reference.sh).
//
// Reads DIR/docs.tsv (id \t contents) and DIR/queries.tsv (id \t text); writes
//   DIR/lucene_tokens.txt  EnglishAnalyzer tokens, one line per doc then per query
//   DIR/lucene_run.tsv     top 100 per query: qid \t doc id \t rank \t score
// The index is Lucene's own (EnglishAnalyzer, BM25Similarity(k1, b)); queries are bags of words
// with each term boosted by its count, as Anserini's BagOfWordsQueryGenerator builds them.
import java.io.IOException;
import java.io.PrintWriter;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.lucene.analysis.Analyzer;
import org.apache.lucene.analysis.TokenStream;
import org.apache.lucene.analysis.en.EnglishAnalyzer;
import org.apache.lucene.analysis.tokenattributes.CharTermAttribute;
import org.apache.lucene.document.Document;
import org.apache.lucene.document.Field;
import org.apache.lucene.document.StringField;
import org.apache.lucene.document.TextField;
import org.apache.lucene.index.DirectoryReader;
import org.apache.lucene.index.IndexWriter;
import org.apache.lucene.index.IndexWriterConfig;
import org.apache.lucene.index.Term;
import org.apache.lucene.search.BooleanClause;
import org.apache.lucene.search.BooleanQuery;
import org.apache.lucene.search.BoostQuery;
import org.apache.lucene.search.IndexSearcher;
import org.apache.lucene.search.ScoreDoc;
import org.apache.lucene.search.TermQuery;
import org.apache.lucene.search.TopDocs;
import org.apache.lucene.search.similarities.BM25Similarity;
import org.apache.lucene.store.ByteBuffersDirectory;

public class LuceneBm25Reference {
    static List<String[]> readTsv(Path path) throws IOException {
        List<String[]> rows = new ArrayList<>();
        for (String line : Files.readAllLines(path)) {
            rows.add(line.split("\t", 2));
        }
        return rows;
    }

    static List<String> analyze(Analyzer analyzer, String text) throws IOException {
        List<String> terms = new ArrayList<>();
        try (TokenStream stream = analyzer.tokenStream("contents", text)) {
            CharTermAttribute term = stream.addAttribute(CharTermAttribute.class);
            stream.reset();
            while (stream.incrementToken()) {
                terms.add(term.toString());
            }
            stream.end();
        }
        return terms;
    }

    public static void main(String[] args) throws Exception {
        Path dir = Paths.get(args[0]);
        float k1 = Float.parseFloat(args[1]);
        float b = Float.parseFloat(args[2]);
        Analyzer analyzer = new EnglishAnalyzer();
        List<String[]> docs = readTsv(dir.resolve("docs.tsv"));
        List<String[]> queries = readTsv(dir.resolve("queries.tsv"));
        try (PrintWriter out = new PrintWriter(Files.newBufferedWriter(dir.resolve("lucene_tokens.txt")))) {
            for (String[] row : docs) out.println(String.join(" ", analyze(analyzer, row[1])));
            for (String[] row : queries) out.println(String.join(" ", analyze(analyzer, row[1])));
        }
        BM25Similarity similarity = new BM25Similarity(k1, b);
        ByteBuffersDirectory store = new ByteBuffersDirectory();
        IndexWriterConfig config = new IndexWriterConfig(analyzer).setSimilarity(similarity);
        try (IndexWriter writer = new IndexWriter(store, config)) {
            for (String[] row : docs) {
                Document doc = new Document();
                doc.add(new StringField("id", row[0], Field.Store.YES));
                doc.add(new TextField("contents", row[1], Field.Store.NO));
                writer.addDocument(doc);
            }
        }
        IndexSearcher searcher = new IndexSearcher(DirectoryReader.open(store));
        searcher.setSimilarity(similarity);
        try (PrintWriter out = new PrintWriter(Files.newBufferedWriter(dir.resolve("lucene_run.tsv")))) {
            for (String[] row : queries) {
                Map<String, Integer> counts = new LinkedHashMap<>();
                for (String t : analyze(analyzer, row[1])) counts.merge(t, 1, Integer::sum);
                BooleanQuery.Builder query = new BooleanQuery.Builder();
                for (Map.Entry<String, Integer> e : counts.entrySet()) {
                    TermQuery tq = new TermQuery(new Term("contents", e.getKey()));
                    query.add(new BoostQuery(tq, e.getValue()), BooleanClause.Occur.SHOULD);
                }
                TopDocs top = searcher.search(query.build(), 100);
                int rank = 1;
                for (ScoreDoc hit : top.scoreDocs) {
                    String id = searcher.doc(hit.doc).get("id");
                    out.println(row[0] + "\t" + id + "\t" + rank++ + "\t" + hit.score);
                }
            }
        }
    }
}
